"""Run the real vLLM engine in-process on a JSON spec and print what the tests check, as JSON.

Tests run this in a subprocess (one engine per process, so configurations never mix) with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which puts the scheduler in this process where its block
pool and preemptions can be observed step by step. Nothing is mocked: it is the engine
``vllm serve`` runs, driven through ``LLMEngine.add_request``/``step``.

The timeline records, after every step, the pool's free blocks and the real (non-null) blocks
each running request holds.

Spec keys: ``model`` (path), ``engine`` (kwargs for ``LLM``), ``requests`` (list of
``{"id", "prompt_token_ids" | "prompt", "max_tokens", "extra_args"}``), ``stagger`` (add one
request per step instead of all at once; a request that names ``"after"`` waits until that request
has finished), ``aborts`` (``[{"id", "after_step"}]``: abort a request after that many steps),
``debug`` (turn on the workers' attention debug hook), ``all_ranks`` (report every
tensor-parallel worker, not only rank 0), ``kept`` (with ``debug``: the kept positions of every
compaction of every request, per rank, and of its last run before a preemption's recompute), ``metrics`` (vLLM's own counters after the run; needs
``"disable_log_stats": false`` in ``engine``). A request may ask for ``logprobs``, ``n`` and a
``temperature`` (default greedy).
"""

from __future__ import annotations

import json
import os
import sys



def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec.get("engine", {}))
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    preemptions = {"count": 0}
    original_preempt = sched._preempt_request

    def counting_preempt(*args, **kwargs):
        preemptions["count"] += 1
        return original_preempt(*args, **kwargs)

    sched._preempt_request = counting_preempt
    # Blocks taken out of the prefix cache through evict_blocks (a pressure compaction does
    # that to the blocks it will rewrite), counted when they had a hash.
    unhashed = {"count": 0}
    original_evict = pool.evict_blocks

    def counting_evict(block_ids):
        unhashed["count"] += sum(1 for b in block_ids if pool.blocks[b].block_hash is not None)
        return original_evict(block_ids)

    pool.evict_blocks = counting_evict
    # Steps at which a block that a request's compactions rewrite (at or after its first
    # eviction) was in the prefix cache: must stay 0.
    hashed_rewritable = []
    if spec.get("debug"):
        llm.collective_rpc("snapkv_set_debug", args=(True,))
    free_start = pool.get_num_free_blocks()
    pending = list(spec["requests"])
    outputs: dict[str, dict] = {}
    timeline: list[dict] = []
    finished_seqs: dict[str, dict[int, list[int]]] = {}

    def add(req: dict) -> None:
        sp = SamplingParams(max_tokens=req.get("max_tokens", 8), n=req.get("n", 1),
                            temperature=req.get("temperature", 0),
                            ignore_eos=req.get("ignore_eos", True), logprobs=req.get("logprobs"),
                            extra_args=req.get("extra_args"))
        prompt = ({"prompt_token_ids": req["prompt_token_ids"]} if "prompt_token_ids" in req
                  else req["prompt"])
        engine.add_request(req["id"], prompt, sp)

    if not spec.get("stagger"):
        while pending:
            add(pending.pop(0))
    steps = 0
    aborts = {a["after_step"]: a["id"] for a in spec.get("aborts", [])}
    while pending or engine.has_unfinished_requests():
        if pending and pending[0].get("after", None) in (None, *outputs):
            add(pending.pop(0))
        if steps in aborts:
            engine.abort_request([aborts[steps]])
            outputs[aborts[steps]] = {"aborted_at_step": steps}
        for out in engine.step():
            for o in out.outputs:  # n > 1: sequences may finish in different steps
                if o.finish_reason is not None:
                    finished_seqs.setdefault(out.request_id, {})[o.index] = list(o.token_ids)
            if out.finished:
                c = out.outputs[0]
                outputs[out.request_id] = {"token_ids": list(c.token_ids), "text": c.text,
                                           "prompt_len": len(out.prompt_token_ids or []),
                                           "num_cached_tokens": out.num_cached_tokens,
                                           "kv_transfer_params": out.kv_transfer_params,
                                           "completions": [
                                               seq for _, seq in sorted(
                                                   finished_seqs[out.request_id].items())]}
                if c.logprobs:
                    outputs[out.request_id]["logprobs"] = [
                        lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]
        schedules = {rid: s.prompt_len for rid, s in getattr(sched, "snapkv_schedules",
                                                              {}).items()}
        held, computed = {}, {}
        for req in sched.running:
            sched_obj = getattr(sched, "snapkv_schedules", {}).get(req.request_id)
            limit = sched_obj.cache_limit if sched_obj is not None else None
            if limit is not None:
                for manager in sched.kv_cache_manager.coordinator.single_type_managers:
                    blocks = manager.req_to_blocks.get(req.request_id, [])
                    if any(not b.is_null and b.block_hash is not None
                           for b in blocks[limit // manager.block_size:]):
                        hashed_rewritable.append(steps)
            computed[req.request_id.rsplit("-", 1)[0]] = req.num_computed_tokens
            blocks = sched.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.get(
                req.request_id, [])
            # Engine-side ids carry a suffix after the caller's id.
            held[req.request_id.rsplit("-", 1)[0]] = sum(1 for b in blocks if not b.is_null)
        timeline.append({"free": pool.get_num_free_blocks(), "running": len(sched.running),
                         "schedules": schedules, "held": held, "computed": computed})
        steps += 1
        if steps > spec.get("max_steps", 5000):
            raise RuntimeError("engine did not finish")
    snapkv = sched.__class__.__name__.startswith("SnapKV")
    reports = llm.collective_rpc("snapkv_report") if snapkv else [None]
    kept = ({rid: llm.collective_rpc("snapkv_kept", args=(rid, "all")) for rid in outputs}
            if snapkv and spec.get("kept") else None)
    kept_before = ({rid: llm.collective_rpc("snapkv_kept", args=(rid, "before_recompute"))
                    for rid in outputs} if snapkv and spec.get("kept") else None)
    metrics = None
    if spec.get("metrics"):
        metrics = {}
        for m in llm.get_metrics():
            if hasattr(m, "value") and isinstance(m.value, (int, float)):
                metrics[m.name] = metrics.get(m.name, 0) + m.value
    print("ENGINE_PROBE_RESULT " + json.dumps({
        "snapkv_report": reports[0], "rank_reports": reports if spec.get("all_ranks") else None,
        "kept": kept, "kept_before_recompute": kept_before, "metrics": metrics,
        "free_start": free_start, "free_end": pool.get_num_free_blocks(),
        "num_blocks": pool.num_gpu_blocks, "block_size": sched.cache_config.block_size,
        "preemptions": preemptions["count"], "outputs": outputs, "timeline": timeline,
        "unhashed_blocks": unhashed["count"], "hashed_rewritable_steps": hashed_rewritable,
        "scheduler": type(sched).__name__,
    }))


def run(spec: dict, timeout: int = 900, env: dict | None = None) -> dict:
    """Run this probe on ``spec`` in a fresh interpreter (``env`` added to its environment)
    and return its result."""
    import subprocess

    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("ENGINE_PROBE_RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].split(" ", 1)[1])


if __name__ == "__main__":
    main()
