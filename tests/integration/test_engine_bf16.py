"""Paged SnapKV in **bf16** inside the real vLLM engine (offline ``LLM`` API, no mocks).

Users on modern Xeons serve bf16: there vLLM's CPU attention picks its AMX kernel, whose cache
packing (16-token tiles, VNNI pairs) differs from the ``vec``/``vec16`` kernels' (K column-major,
V row-major). The plugin reads and writes single tokens through the layout probed from the
kernel's own write op, so both must work; this file proves it on whichever kernel this machine's
vLLM selects for bf16 (``amx`` with AMX tiles, ``vec`` otherwise) — and asserts that the worker
really ran that kernel's layout, so a green run says which one it covered.

* tiny model, bf16: a compressed request beside an uncompressed one; attention over the
  compacted cache equals dense fp64 attention over exactly the kept tokens (bf16 tolerance:
  the kernel rounds its bf16 inputs/outputs; a wrong layout gives errors of the order of the
  output itself), slots ``[E, N)`` hold exactly the kept K/V (bit copies);
* SmolLM2, bf16: planted numbers are still retrieved with compression on.
"""

from __future__ import annotations

import gc
import random
from contextlib import contextmanager

import pytest
import torch

pytestmark = pytest.mark.engine

WORKER = "vllm_snapkv.integration.worker.SnapKVCPUWorker"
BUDGET, WINDOW, KERNEL = 256, 32, 15
SNAPKV = {"kv_compression": "snapkv",
          "snapkv": {"budget": BUDGET, "window": WINDOW, "kernel": KERNEL}}
#: bf16 outputs carry ~2^-8 relative rounding (measured: 2.4e-4 at |ref| 0.1 on the tiny model,
#: 1.6e-2 at |ref| 7.9 on SmolLM2); a layout bug is O(1) relative.
REL_TOL = 1e-2


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


@contextmanager
def _llm(model, **kw):
    from vllm import LLM

    llm = LLM(model=str(model), dtype="bfloat16", max_model_len=4096,
              enable_prefix_caching=False, worker_cls=WORKER, additional_config=SNAPKV,
              enforce_eager=True, **kw)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _sp(max_tokens=8, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=extra or None)


def _find(mapping: dict, request_id: str):
    hits = [v for k, v in mapping.items() if k == request_id or k.startswith(request_id + "-")]
    assert len(hits) == 1, (request_id, list(mapping))
    return hits[0]


def _expected_isa(block_size: int, head_size: int) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(torch.bfloat16, block_size, head_size, "auto")


def _check_layouts(rep: dict, block_size: int, head_size: int) -> str:
    isa = _expected_isa(block_size, head_size)
    layouts = set(rep["layouts"].values())
    assert len(layouts) == 1, layouts
    (desc,) = layouts
    assert desc.startswith(f"isa={isa} dtype=bfloat16"), (desc, isa)
    print(f"\n[snapkv] bf16 engine ran the {isa!r} kernel layout: {desc}")
    return isa


def _assert_exact(rep: dict, request_id: str, num_layers: int, n: int, block: int) -> None:
    evicted = (n - BUDGET) // block * block
    comp = _find(rep["compactions"], request_id)
    assert comp["prompt_len"] == n and comp["evicted"] == evicted and comp["layers"] == num_layers
    dbg = rep["debug"]
    assert _find(dbg["checks"], request_id) >= num_layers
    assert _find(dbg["slot_err"], request_id) == 0.0
    err, ref = _find(dbg["max_err"], request_id), _find(dbg["max_ref"], request_id)
    print(f"\n[snapkv] bf16 request {request_id}: N={n} E={evicted} max_err={err:.3g} "
          f"(max |ref|={ref:.3g})")
    assert err <= REL_TOL * ref, (err, ref)


def test_bf16_compaction_is_exact_over_kept_tokens(tiny_path):
    with _llm(tiny_path, kv_cache_memory_bytes=1 << 28, max_num_batched_tokens=4096) as llm:
        llm.collective_rpc("snapkv_set_debug", args=(True,))
        prompts = [_ids(1600, 21), _ids(120, 22)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _sp(16),
                            use_tqdm=False)
        (rep,) = llm.collective_rpc("snapkv_report")
        block = llm.llm_engine.vllm_config.cache_config.block_size
    _check_layouts(rep, block, 64)
    _assert_exact(rep, outs[0].request_id, 2, 1600, block)
    assert not any(k.startswith(outs[1].request_id + "-") for k in rep["compactions"])
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def test_bf16_smollm2_needle_with_compression(smollm2_path):
    codes = [(48213, 70), (90517, 90)]
    prompts = [FILLER * reps + f"Remember this: the secret number is {code}. " + FILLER * 2
               + "\nQuestion: What is the secret number?\nAnswer: The secret number is"
               for code, reps in codes]
    with _llm(smollm2_path, kv_cache_memory_bytes=1 << 29) as llm:
        llm.collective_rpc("snapkv_set_debug", args=(True,))
        outs = llm.generate(prompts, _sp(8), use_tqdm=False)
        (rep,) = llm.collective_rpc("snapkv_report")
        block = llm.llm_engine.vllm_config.cache_config.block_size
    _check_layouts(rep, block, 64)
    for (code, _), out in zip(codes, outs):
        n = len(out.prompt_token_ids)
        assert n > 1500
        _assert_exact(rep, out.request_id, 30, n, block)
        assert str(code) in out.outputs[0].text, out.outputs[0].text
