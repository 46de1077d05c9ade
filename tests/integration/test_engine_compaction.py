"""Paged SnapKV inside the real vLLM engine (offline ``LLM`` API, no mocks).

Every test runs on its own: references it needs (vanilla vLLM's tokens) come from fixtures, not
from other tests. Engines (2 shared CPU cores, one at a time):

* vanilla vLLM on the tiny random Llama (default worker, no ``additional_config``) — reference
  tokens (a module fixture, built when a test asks for it);
* SnapKV worker, tiny model, unchunked prefill, **torch.compile on** (no ``enforce_eager``):
  (a) nothing compressed => tokens identical to vanilla; (b) a long prompt compressed (N=1600,
  budget 256, block 128 => E=1280) in a mixed batch with another long one and a short
  uncompressed one: the short one's tokens equal vanilla's, and the debug hook shows the
  attention over the compacted paged cache equals dense attention over exactly the kept tokens;
* SnapKV worker, tiny model, chunked prefill (512-token chunks, N = 3*512 + 10, window 32: the
  final chunk is shorter than the window, so 22 window queries come from the stash);
* SnapKV worker, tiny model, a small KV pool that forces the compressed request to be preempted
  after its compaction: it is recomputed from 0 and compacted again, and stays exact;
* SnapKV worker on SmolLM2-135M-Instruct, chunked so that the window spans two chunks: the kept
  sets of all 30 layers x 3 KV heads equal those of the textbook formula fed by plain HF
  transformers on the same tokens (a window off by one position keeps other tokens and fails),
  and a number stated near the end of a long filler prompt is still retrieved.

The debug hook (``snapkv_set_debug`` RPC) records, at compaction, the original K/V of the kept
tokens and compares every later step's attention output of the compacted request, per layer, with
dense fp64 attention over exactly those tokens plus the generated ones.
"""

from __future__ import annotations

import gc
import random
from contextlib import contextmanager

import pytest

pytestmark = pytest.mark.engine

WORKER = "vllm_snapkv.integration.worker.SnapKVCPUWorker"
BUDGET, WINDOW, KERNEL, BLOCK = 256, 32, 15, 128
SNAPKV = {"kv_compression": "snapkv",
          "snapkv": {"budget": BUDGET, "window": WINDOW, "kernel": KERNEL}}
#: Attention over the compacted cache vs. dense attention over the kept tokens: fp32 noise.
ATOL = 1e-5

N_LONG, N_LONG2, N_SHORT = 1600, 2000, 100
CHUNK = 512
N_CHUNKED = 3 * CHUNK + 10  # final chunk: 10 tokens < window 32


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


LONG = _ids(N_LONG, 1)
LONG2 = _ids(N_LONG2, 2)
SHORT = _ids(N_SHORT, 3)
SHORT2 = _ids(60, 4)
CHUNKED = _ids(N_CHUNKED, 5)


def _evicted(n: int) -> int:
    return max(0, (n - BUDGET) // BLOCK * BLOCK)


def _engine_kwargs(model, **kw):
    return dict(model=str(model), dtype="float32", max_model_len=4096,
                kv_cache_memory_bytes=1 << 28, enable_prefix_caching=False, seed=0, **kw)


@contextmanager
def _llm(**kwargs):
    from vllm import LLM

    llm = LLM(**kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _sp(max_tokens=16, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=extra or None)


def _gen(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.request_id for o in outs]


def _report(llm) -> dict:
    (rep,) = llm.collective_rpc("snapkv_report")
    return rep


def _find(mapping: dict, request_id: str):
    """Worker-side ids are the offline request id plus a suffix."""
    hits = [v for k, v in mapping.items() if k == request_id or k.startswith(request_id + "-")]
    assert len(hits) == 1, (request_id, list(mapping))
    return hits[0]


def _assert_exact_over_kept(rep: dict, request_id: str, num_layers: int, n: int) -> None:
    comp = _find(rep["compactions"], request_id)
    assert comp["prompt_len"] == n and comp["evicted"] == _evicted(n)
    assert comp["kept"] == n - _evicted(n) and comp["layers"] == num_layers
    dbg = rep["debug"]
    checks = _find(dbg["checks"], request_id)
    assert checks >= num_layers  # every layer compared in at least one later step
    assert _find(dbg["slot_err"], request_id) == 0.0  # slots [E, N) hold exactly the kept K/V
    err, ref = _find(dbg["max_err"], request_id), _find(dbg["max_ref"], request_id)
    print(f"\n[snapkv] request {request_id}: N={n} E={comp['evicted']} kept={comp['kept']} "
          f"layers={comp['layers']} checks={checks} max_err={err:.3g} (max |ref|={ref:.3g}) "
          f"window_from_stash={comp['window_from_stash']}")
    assert err <= ATOL * max(1.0, ref), (err, ref)


# ---------------------------------------------------------------------------------------------
# Vanilla reference (a fixture: built for whichever test asks first)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vanilla(tiny_path) -> dict:
    with _llm(**_engine_kwargs(tiny_path, max_num_batched_tokens=4096)) as llm:
        mixed, _ = _gen(llm, [LONG, LONG2, SHORT], _sp())
        same, _ = _gen(llm, [LONG, SHORT2, SHORT], _sp())
    return {"mixed": mixed, "same": same}


# ---------------------------------------------------------------------------------------------
# SnapKV, unchunked prefill, torch.compile on
# ---------------------------------------------------------------------------------------------


class TestUnchunked:
    @pytest.fixture(scope="class")
    @classmethod
    def llm(cls, tiny_path):
        with _llm(**_engine_kwargs(tiny_path, max_num_batched_tokens=4096, worker_cls=WORKER,
                                   additional_config=SNAPKV)) as llm:
            assert llm.collective_rpc("snapkv_set_debug", args=(True,)) == [True]
            yield llm

    def test_backend_is_installed(self, llm):
        (impls,) = llm.collective_rpc("snapkv_attention_impls")
        layers = {k: v for k, v in impls.items() if ":" not in k}
        assert layers and set(layers.values()) == {"SnapKVCPUImpl"}
        assert {v for k, v in impls.items() if k.startswith("builder:")} == \
            {"SnapKVCPUMetadataBuilder"}
        assert _report(llm)["model_runner"] == "SnapKVCPUModelRunner"

    def test_uncompressed_requests_match_vanilla(self, llm, vanilla):
        # Budget >= prompt length for the long one, explicit opt-out, and a short prompt.
        params = [_sp(snapkv_budget=4096), _sp(kv_compression="none"), _sp()]
        before = _report(llm)["num_compactions"]
        tokens, _ = _gen(llm, [LONG, SHORT2, SHORT], params)
        assert _report(llm)["num_compactions"] == before  # nothing was compacted
        assert tokens == vanilla["same"]

    def test_mixed_batch_compacted_exactly(self, llm, vanilla):
        tokens, ids = _gen(llm, [LONG, LONG2, SHORT], _sp())
        rep = _report(llm)
        _assert_exact_over_kept(rep, ids[0], 2, N_LONG)
        _assert_exact_over_kept(rep, ids[1], 2, N_LONG2)
        assert _evicted(N_LONG) == 1280
        assert _find(rep["compactions"], ids[0])["window_from_stash"] == 0  # unchunked
        assert not any(k.startswith(ids[2] + "-") for k in rep["compactions"])
        # The short, uncompressed request decoding beside them is untouched.
        assert tokens[2] == vanilla["mixed"][2]
        assert all(len(t) == 16 for t in tokens)
        assert rep["stash_entries"] == 0

# ---------------------------------------------------------------------------------------------
# SnapKV, chunked prefill: the final chunk is shorter than the window
# ---------------------------------------------------------------------------------------------


class TestChunked:
    @pytest.fixture(scope="class")
    @classmethod
    def llm(cls, tiny_path):
        with _llm(**_engine_kwargs(tiny_path, max_num_batched_tokens=CHUNK,
                                   long_prefill_token_threshold=CHUNK, enforce_eager=True,
                                   worker_cls=WORKER, additional_config=SNAPKV)) as llm:
            llm.collective_rpc("snapkv_set_debug", args=(True,))
            yield llm

    def test_final_chunk_shorter_than_window(self, llm):
        _, ids = _gen(llm, [CHUNKED], _sp(max_tokens=4))
        rep = _report(llm)
        _assert_exact_over_kept(rep, ids[0], 2, N_CHUNKED)
        # 32 - 10 window queries came from the earlier chunks' stash.
        assert _find(rep["compactions"], ids[0])["window_from_stash"] == WINDOW - 10
        assert rep["stash_entries"] == 0  # dropped after compaction

    def test_chunked_mixed_batch(self, llm):
        tokens, ids = _gen(llm, [LONG, SHORT], _sp(max_tokens=8))
        rep = _report(llm)
        _assert_exact_over_kept(rep, ids[0], 2, N_LONG)
        assert all(len(t) == 8 for t in tokens)


# ---------------------------------------------------------------------------------------------
# Preemption: a compacted request is preempted, recomputed from 0 and compacted again
# ---------------------------------------------------------------------------------------------


def test_preempted_request_is_compacted_again(tiny_path):
    # 26 usable blocks of 128. Two uncompressed requests (admitted first) grow until the pool
    # runs out; the compressed one, admitted last, is the preemption victim, resumes later,
    # recomputes its prompt (plus the tokens generated so far) and is compacted again.
    kwargs = _engine_kwargs(tiny_path, max_num_batched_tokens=4096, enforce_eager=True,
                            worker_cls=WORKER, additional_config=SNAPKV)
    kwargs.update(max_model_len=2048, num_gpu_blocks_override=27)
    prompts = [_ids(1500, 11), _ids(500, 12), _ids(1200, 13)]
    params = [_sp(540, kv_compression="none"), _sp(1500, kv_compression="none"), _sp(800)]
    with _llm(**kwargs) as llm:
        llm.collective_rpc("snapkv_set_debug", args=(True,))
        tokens, ids = _gen(llm, prompts, params)
        rep = _report(llm)
    assert [len(t) for t in tokens] == [540, 1500, 800]
    comp = _find(rep["compactions"], ids[2])
    assert comp["times"] >= 2, comp  # compacted, preempted, recomputed, compacted again
    _assert_exact_over_kept(rep, ids[2], 2, 1200)
    assert rep["stash_entries"] == 0


# ---------------------------------------------------------------------------------------------
# SmolLM2: the kept sets equal an independent reference; an answer survives compression
# ---------------------------------------------------------------------------------------------

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def _needle(code: int, reps: int) -> str:
    return (FILLER * reps + f"Remember this: the secret number is {code}. " + FILLER * 2
            + "\nQuestion: What is the secret number?\nAnswer: The secret number is")


def test_smollm2_kept_sets_equal_the_hf_reference(smollm2_path):
    """Which tokens are kept, per layer and KV head, against plain HF transformers: the prompt is
    read in 512-token chunks and its last chunk is 10 tokens long, so 22 of the 32 window queries
    come from the stash. The reference feeds HF's own post-RoPE queries of the last 32 positions
    and keys of the whole prompt to the textbook formula (float64). Measured: 90/90 sets
    identical; the same comparison with the window shifted by one position gave 1/90."""
    from transformers import AutoTokenizer

    from hf_reference import prefill_qk
    from snapkv_reference import reference_keep

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    ids = tok(_needle(48213, 70))["input_ids"]
    ids = ids[: len(ids) // CHUNK * CHUNK + 10]
    n, budget = len(ids), 512
    kwargs = _engine_kwargs(smollm2_path, enforce_eager=True, worker_cls=WORKER,
                            max_num_batched_tokens=CHUNK, long_prefill_token_threshold=CHUNK,
                            additional_config={"kv_compression": "snapkv", "snapkv": {
                                "budget": budget, "window": WINDOW, "kernel": KERNEL}})
    kwargs["kv_cache_memory_bytes"] = 1 << 29
    with _llm(**kwargs) as llm:
        llm.collective_rpc("snapkv_set_debug", args=(True,))
        _, rids = _gen(llm, [ids], _sp(max_tokens=4))
        (kept,) = llm.collective_rpc("snapkv_kept", args=(rids[0],))
        rep = _report(llm)
    comp = _find(rep["compactions"], rids[0])
    assert comp["window_from_stash"] == WINDOW - 10
    keep = n - (n - budget) // BLOCK * BLOCK  # the tail placement keeps whole blocks
    reference = prefill_qk(smollm2_path, ids, WINDOW)
    assert len(kept) == len(reference) == 30
    same = total = 0
    jaccard = 0.0
    for i, (q, k) in enumerate(reference):
        ref, _ = reference_keep(q, k, budget=keep, window=WINDOW, kernel=KERNEL, pooling="avg",
                                reduction="sum", gqa_aggregation="mean", sink=0)
        ours = kept[f"model.layers.{i}.self_attn.attn"]
        for h, row in enumerate(ours):
            a, b = set(row), set(ref[h])
            same += a == b
            jaccard += len(a & b) / len(a | b)
            total += 1
    print(f"\n[snapkv] SmolLM2 kept sets vs HF reference: {same}/{total} identical, "
          f"mean Jaccard {jaccard / total:.5f}")
    assert same >= 0.97 * total and jaccard / total >= 0.999


def test_smollm2_answers_with_compression(smollm2_path):
    kwargs = _engine_kwargs(smollm2_path, enforce_eager=True, worker_cls=WORKER,
                            additional_config=SNAPKV)
    kwargs["kv_cache_memory_bytes"] = 1 << 29
    codes = [(48213, 70), (90517, 90)]
    prompts = [_needle(code, reps) for code, reps in codes]
    with _llm(**kwargs) as llm:
        llm.collective_rpc("snapkv_set_debug", args=(True,))
        outs = llm.generate(prompts, _sp(max_tokens=8), use_tqdm=False)
        rep = _report(llm)
    for (code, _), out in zip(codes, outs):
        n = len(out.prompt_token_ids)
        assert n > 1500
        _assert_exact_over_kept(rep, out.request_id, 30, n)
        assert str(code) in out.outputs[0].text, out.outputs[0].text


def test_smollm2_compact_at_ranks_the_context_before_the_question(smollm2_path):
    """``vllm_xargs.snapkv_compact_at`` (the question-less regime): the prompt compaction runs
    before the question, so what is kept is what the textbook formula keeps on the context
    alone — HF's queries of the context's last 32 positions and keys of the context, float64 —
    the question's tokens are all kept after it, and attention over the result stays exact."""
    from transformers import AutoTokenizer

    from hf_reference import prefill_qk
    from snapkv_reference import reference_keep

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    context = tok(FILLER * 70 + "Remember this: the secret number is 48213. " + FILLER * 2)
    question = tok("\nQuestion: What is the secret number?\nAnswer: The secret number is",
                   add_special_tokens=False)["input_ids"]
    ids = context["input_ids"] + question
    n, a, budget = len(ids), len(context["input_ids"]), 512
    kwargs = _engine_kwargs(smollm2_path, enforce_eager=True, worker_cls=WORKER,
                            additional_config={"kv_compression": "snapkv", "snapkv": {
                                "budget": budget, "window": WINDOW, "kernel": KERNEL}})
    kwargs["kv_cache_memory_bytes"] = 1 << 29
    with _llm(**kwargs) as llm:
        llm.collective_rpc("snapkv_set_debug", args=(True,))
        outs, rids = _gen(llm, [ids], _sp(max_tokens=8, snapkv_compact_at=-len(question)))
        (kept,) = llm.collective_rpc("snapkv_kept", args=(rids[0],))
        rep = _report(llm)
    evicted = (a - budget) // BLOCK * BLOCK
    comp = _find(rep["compactions"], rids[0])
    assert comp["evicted"] == evicted and comp["kept"] == a - evicted
    dbg = rep["debug"]
    assert _find(dbg["slot_err"], rids[0]) == 0.0
    err, ref = _find(dbg["max_err"], rids[0]), _find(dbg["max_ref"], rids[0])
    assert err <= ATOL * max(1.0, ref), (err, ref)
    reference = prefill_qk(smollm2_path, ids[:a], WINDOW)
    same = total = 0
    for i, (q, k) in enumerate(reference):
        ref_keep, _ = reference_keep(q, k, budget=a - evicted, window=WINDOW, kernel=KERNEL,
                                     pooling="avg", reduction="sum", gqa_aggregation="mean",
                                     sink=0)
        for h, row in enumerate(kept[f"model.layers.{i}.self_attn.attn"]):
            assert len(row) == a - evicted and max(row) < a  # ranked: the context only
            same += set(row) == set(ref_keep[h])
            total += 1
    print(f"\n[snapkv] compact_at: kept sets vs HF reference on the context: {same}/{total}")
    assert same >= 0.97 * total
    assert "48213" in tok.decode(outs[0])
