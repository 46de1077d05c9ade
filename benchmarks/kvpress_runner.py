"""NVIDIA kvpress 0.5.5 as a peer on the needle task: same token ids, same kept count per KV head.

Why: issue 6 compares our SnapKV-in-vLLM with kvpress's ``SnapKVPress`` on HF transformers at the
same kept fraction, and checks that with our ``kvpress`` preset the kept sets coincide
(``benchmarks/agreement.py`` reads the kept positions recorded here).

What runs, per case (``benchmarks.needle.Case``) and budget ``b < len(prompt_ids)``:

* the model (HF transformers, fp32, SDPA, CPU) prefills exactly ``prompt_ids`` — no BOS, no chat
  template — under kvpress's own hook mechanism (``BasePress.__call__``), with
  ``SnapKVPress(compression_ratio=1 - b/N)`` at its own defaults (window 64, kernel 5). kvpress
  keeps ``int(N * (1 - cr))`` tokens per KV head; lengths and budgets are powers of two (or at least
  make ``b/N`` exact), and the count seen in the pruned cache is asserted to equal ``b``. The whole
  prompt is compressed, so the question sits inside kvpress's observation window, as in our vLLM
  plugin — which is why kvpress's pipeline (it prefills a context and then feeds the question
  *uncompressed*) is not used;
* one prefill serves every budget and the full cache (:func:`_fanout_press`): each attention
  layer's hook hands the layer's keys and values to every budget's own ``SnapKVPress.compress``
  and keeps the pruned copies. kvpress compresses *after* the layer's attention, so nothing the
  prefill computes depends on the pruning; the first case of each length (``verify_per_length``)
  is also run the plain way, one prefill per budget, and kept positions and answers must be
  identical (``meta.equivalence_checks``);
* the first token comes from the prefill's logits (every prompt token attended to the full
  prompt, as in vLLM, where compaction follows the prefill attention); then greedy decoding runs
  on each budget's pruned ``DynamicCache`` with explicit true positions ``N, N+1, ...`` (as
  kvpress's ``KVPressTextGenerationPipeline.generate_answer`` does), stopping at
  ``max_new_tokens`` or EOS; the whole cache gives the full-cache answer.

kvpress's kept positions are recorded by a ``SnapKVPress`` subclass that changes nothing: after
kvpress's own ``compress`` it takes ``scores.topk(n_kept)`` (as ``ScorerPress.compress`` does) and,
after the prefill, verifies that kvpress's pruned cache equals the pre-compression keys gathered at
those positions, bit for bit, in every layer (as ``kvpress_crosscheck.py`` does).

Runs in kvpress's venv (``benchmarks/kvpress_venv.py``) as ``python -m benchmarks.kvpress_runner``
from the repository root; started with another Python, the CLI re-executes itself there. So it
imports only the standard library, torch, transformers, kvpress and the stdlib-only
``benchmarks.kvpress_venv`` and ``benchmarks.needle`` (kvpress's venv has no vLLM). Budget 64
equals kvpress's window: it keeps only the window (degenerate, run anyway; our plugin refuses a
budget <= window).

Input (``--spec``)::

    {"cases": [Case.to_dict(), ...], "budgets": [64, 128, 256, 512, 1024], "max_new_tokens": 10,
     "record_kept": ["n1024-000", ...], "model": "/path/to/hf/model", "threads": null,
     "verify_per_length": 1}

(``threads``, optional: ``torch.set_num_threads``; default torch's. On a 2-core machine shared with
other jobs, 1 thread was up to 4x faster than 2 for a 1K-token prefill: OpenMP threads contend.)

Output (``--out``)::

    {"meta": {...versions, press settings, kept_encoding, notes},
     "cases": [{"id", "length", "depth", "answer", "full": text, "kvpress": {"128": text, ...},
                "correct": {"full": bool, "128": bool, ...},
                "prefill_s": {"all": s}, "decode_s": {"full": s, "128": s, ...}}],
     "accuracy": {"1024": {"full": {"correct", "total", "accuracy"}, "128": {...}, ...}},
     "prefill_s": {"1024": {"all": mean_s}},
     "kept": {case_id: {"length": N, "prompt_ids": [...],
                        "scores": [[float32 base64 per KV head] per layer],
                        "budgets": {"128": [[bitmap base64 per KV head] per layer], ...}}}}

Budget keys are strings (JSON). ``kept`` holds the cases named in ``record_kept``: a kept set is the
base64 of an N-bit little-endian bitmap (bit ``p`` of byte ``p // 8`` set = position ``p`` kept;
:func:`decode_kept`), and ``scores`` are kvpress's smoothed scores of the ``N - 64`` prefix
positions (they do not depend on the budget; :func:`decode_floats`), which let
``benchmarks/agreement.py`` tell near-ties from real disagreements.

Usage (from the repository root)::

    python -m benchmarks.kvpress_runner --spec SPEC.json --out results/kvpress_needle.json
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import time
from array import array
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

from benchmarks import REPO
from benchmarks.kvpress_venv import ensure_kvpress_python, kvpress_env, kvpress_python
from benchmarks.needle import is_correct

DEFAULT_MODEL = REPO / ".cache" / "models" / "smollm2-135m-instruct"
KEPT_ENCODING = ("per layer, per KV head: base64 of an N-bit little-endian bitmap "
                 "(bit p of byte p//8 set = prompt position p kept)")


# ------------------------------------------------------------------ kept-set encoding (stdlib only)


def encode_positions(positions: list[int], length: int) -> str:
    """Base64 of the ``length``-bit bitmap of ``positions``."""
    buf = bytearray((length + 7) // 8)
    for p in positions:
        buf[p >> 3] |= 1 << (p & 7)
    return base64.b64encode(bytes(buf)).decode("ascii")


def decode_positions(data: str) -> list[int]:
    """Ascending positions of a bitmap from :func:`encode_positions`."""
    buf = base64.b64decode(data)
    return [i * 8 + j for i, byte in enumerate(buf) if byte for j in range(8) if byte >> j & 1]


def decode_kept(layers: list[list[str]]) -> list[list[list[int]]]:
    """``[layer][kv_head] -> ascending kept positions`` from one budget's encoded kept sets."""
    return [[decode_positions(h) for h in heads] for heads in layers]


def encode_floats(values: list[float]) -> str:
    """Base64 of ``values`` as little-endian float32 (exact for float32 inputs)."""
    arr = array("f", values)
    if sys.byteorder == "big":
        arr.byteswap()
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_floats(data: str) -> list[float]:
    """Inverse of :func:`encode_floats`."""
    arr = array("f", base64.b64decode(data))
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tolist()


# ------------------------------------------------------------------ running kvpress (its venv)


def compression_ratio_for(budget: int, length: int) -> float:
    """kvpress ``compression_ratio`` that keeps ``budget`` of ``length`` tokens (checked exact)."""
    from kvpress.utils import compute_n_kept

    cr = 1.0 - budget / length
    if compute_n_kept(length, cr) != budget:
        raise ValueError(f"no exact compression_ratio for budget {budget} of {length} tokens "
                         f"(kvpress would keep {compute_n_kept(length, cr)})")
    return cr


def _recording_press(compression_ratio: float):
    """A ``SnapKVPress`` (kvpress defaults) that records the positions it keeps per layer."""
    import torch
    from kvpress import SnapKVPress
    from kvpress.utils import compute_n_kept

    class RecordingSnapKVPress(SnapKVPress):
        """kvpress's SnapKVPress, unchanged, plus: per layer, the kept positions ``[Hkv, n_kept]``
        (``scores.topk`` as ``ScorerPress.compress`` takes them), the keys they select, and the
        prefix scores ``[Hkv, N - window]`` (before kvpress pads the window with ``max + 1``)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            self.kept: dict[int, torch.Tensor] = {}
            self.expected_keys: dict[int, torch.Tensor] = {}
            self.prefix_scores: dict[int, torch.Tensor] = {}
            self._scores: torch.Tensor | None = None

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            self._scores = super().score(module, hidden_states, keys, values, attentions, kwargs)
            return self._scores

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            out = super().compress(module, hidden_states, keys, values, attentions, kwargs)
            n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
            idx = self._scores.topk(n_kept, dim=-1).indices
            self.expected_keys[module.layer_idx] = keys.gather(
                2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
            self.kept[module.layer_idx] = idx[0].sort(dim=-1).values
            self.prefix_scores[module.layer_idx] = self._scores[0, :, :-self.window_size]
            self._scores = None
            return out

    return RecordingSnapKVPress(compression_ratio=compression_ratio)


def _fanout_press(presses: dict[int, Any]):
    """One prefill, every budget: a kvpress ``BasePress`` whose hook hands each attention layer's
    keys and values to each budget's own press (kvpress's ``SnapKVPress.compress``, unchanged)
    and keeps the pruned results aside, leaving the model's cache whole.

    Why it is the same as one prefill per budget: kvpress compresses in a hook that runs *after*
    the layer's attention (``BasePress.forward_hook``), so the hidden states every later layer
    sees, the logits and therefore each press's inputs do not depend on whether, or how much,
    earlier layers were pruned. ``run`` checks this on real prompts every run (``verify_per_length``):
    the per-budget prefills and this one must give identical kept positions and identical answers.
    It is 6x fewer prefills, which is what makes 50 prompts per cell affordable on a CPU.
    """
    from kvpress.presses.base_press import BasePress, is_prefilling
    from kvpress.utils import extract_keys_and_values

    class BudgetFanOutPress(BasePress):
        def __init__(self) -> None:
            self.presses = presses
            #: budget -> layer -> (pruned keys, pruned values)
            self.pruned: dict[int, dict[int, tuple[Any, Any]]] = {b: {} for b in presses}

        def post_init_from_model(self, model) -> None:
            for press in self.presses.values():
                press.post_init_from_model(model)

        def forward_hook(self, module, input, kwargs, output):
            hidden_states = kwargs["hidden_states"]
            if not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
                return output
            keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
            for b, press in self.presses.items():
                self.pruned[b][module.layer_idx] = press.compress(
                    module, hidden_states, keys, values, output[1], kwargs)
            return output

        def cache(self, budget: int):
            """A ``DynamicCache`` holding ``budget``'s pruned keys and values, as kvpress's own
            hook would have left the model's cache."""
            from transformers import DynamicCache

            cache = DynamicCache()
            for li in sorted(self.pruned[budget]):
                cache.update(*self.pruned[budget][li], li)
            return cache

    return BudgetFanOutPress()


def _prefill(model, ids, press) -> tuple[Any, int, float]:
    """Prefill ``ids`` [1, N] (under ``press`` if given). Returns (cache, first token, seconds)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    t0 = time.perf_counter()
    with press(model) if press is not None else nullcontext():
        logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
    return cache, int(logits[0, -1].argmax()), time.perf_counter() - t0


def _decode(model, cache, first: int, n: int, max_new_tokens: int,
            eos: set[int]) -> tuple[list[int], float]:
    """Greedy decoding on the (pruned) cache of an ``n``-token prompt, with true positions
    ``n, n+1, ...``. Returns (token ids, seconds)."""
    import torch

    t0 = time.perf_counter()
    tokens = [first]
    for i in range(max_new_tokens - 1):
        if tokens[-1] in eos:
            break
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                       position_ids=torch.tensor([[n + i]])).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, time.perf_counter() - t0


def _verified_kept(press, cache, budget: int) -> list[list[list[int]]]:
    """kvpress's kept positions per layer and KV head, verified against its pruned cache."""
    import torch

    kept = []
    for li, layer in enumerate(cache.layers):
        pruned = layer.keys
        if pruned.shape[2] != budget:
            raise AssertionError(f"layer {li}: kvpress kept {pruned.shape[2]} tokens, "
                                 f"expected {budget}")
        if not torch.equal(pruned, press.expected_keys[li]):
            raise AssertionError(f"layer {li}: recorded positions do not reproduce kvpress's "
                                 "pruned cache")
        kept.append(press.kept[li].tolist())
    return kept


def _cells(cases: list[dict], field: str) -> dict[str, dict[str, list]]:
    """``{length: {"full"|budget: [case[field][key] for each case of that length]}}``."""
    cells: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for c in cases:
        for key, v in c[field].items():
            cells[str(c["length"])][key].append(v)
    return cells


def _check_one_prefill_per_budget(model, ids, fan, answers: dict[str, list[int]],
                                  max_new: int, eos: set[int], case_id: str) -> dict:
    """Rerun ``ids`` the plain kvpress way -- a prefill without a press, then one prefill per
    budget under that budget's own press -- and require the fan-out's kept positions (every layer,
    KV head) and answer tokens to be identical. Raises ``AssertionError`` otherwise."""
    n = ids.shape[1]
    cache, first, _ = _prefill(model, ids, None)
    tokens, _ = _decode(model, cache, first, n, max_new, eos)
    if tokens != answers["full"]:
        raise AssertionError(f"{case_id}: full-cache answer differs under the fan-out press")
    for b, fanned in fan.presses.items():
        press = _recording_press(fanned.compression_ratio)
        cache, first, _ = _prefill(model, ids, press)
        kept = _verified_kept(press, cache, b)
        if kept != [fanned.kept[li].tolist() for li in range(len(kept))]:
            raise AssertionError(f"{case_id} budget {b}: kept positions differ between one "
                                 "prefill per budget and the fan-out")
        tokens, _ = _decode(model, cache, first, n, max_new, eos)
        if tokens != answers[str(b)]:
            raise AssertionError(f"{case_id} budget {b}: answer differs between one prefill per "
                                 "budget and the fan-out")
    return {"case": case_id, "length": n, "budgets": sorted(fan.presses), "identical": True}


def load_model(spec: dict) -> tuple[Any, Any, set[int], str]:
    """The spec's model (HF, fp32, SDPA, CPU; ``threads`` applied), its tokenizer, its EOS ids
    and its path, with gradients off."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    transformers.utils.logging.disable_progress_bar()
    model_path = str(spec.get("model") or DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    eos_cfg = model.generation_config.eos_token_id
    eos = set(eos_cfg if isinstance(eos_cfg, list) else [eos_cfg]) - {None}
    return model, tok, eos, model_path


def run(spec: dict, log: Callable[[str], None] = print) -> dict:
    """Run ``spec`` (see the module docstring) in this (kvpress) Python; return the report."""
    import torch
    from importlib.metadata import version
    from kvpress import SnapKVPress

    model, tok, eos, model_path = load_model(spec)
    budgets = sorted(int(b) for b in spec["budgets"])
    max_new = int(spec.get("max_new_tokens", 10))
    record = set(spec.get("record_kept", []))
    defaults = SnapKVPress()
    window = defaults.window_size

    verify_per_length = int(spec.get("verify_per_length", 1))
    out_cases, kept_out, checks, verified = [], {}, [], {}
    started = time.perf_counter()
    with torch.inference_mode():
        for case in spec["cases"]:
            ids = torch.tensor([case["prompt_ids"]])
            n = ids.shape[1]
            if n != case["length"]:
                raise ValueError(f"case {case['id']}: {n} prompt ids, length says {case['length']}")
            row = dict(id=case["id"], length=n, depth=case["depth"], answer=case["answer"],
                       full=None, kvpress={}, correct={}, prefill_s={}, decode_s={})
            fan = _fanout_press({b: _recording_press(compression_ratio_for(b, n))
                                 for b in budgets if b < n})
            cache, first, pre = _prefill(model, ids, fan)
            row["prefill_s"]["all"] = round(pre, 4)
            answers: dict[str, list[int]] = {}
            # the model's cache, left whole by the fan-out: the full-cache answer (decoding
            # appends to it only; the pruned caches are separate tensors)
            answers["full"], dec = _decode(model, cache, first, n, max_new, eos)
            row["full"] = tok.decode(answers["full"], skip_special_tokens=True)
            row["correct"]["full"] = is_correct(row["full"], case["answer"])
            row["decode_s"]["full"] = round(dec, 4)
            for b, press in fan.presses.items():
                key = str(b)
                pruned = fan.cache(b)
                kept = _verified_kept(press, pruned, b)
                answers[key], dec = _decode(model, pruned, first, n, max_new, eos)
                row["kvpress"][key] = text = tok.decode(answers[key], skip_special_tokens=True)
                row["correct"][key] = is_correct(text, case["answer"])
                row["decode_s"][key] = round(dec, 4)
                if case["id"] in record:
                    scores = [[encode_floats(h) for h in press.prefix_scores[li].tolist()]
                              for li in range(len(kept))]
                    entry = kept_out.setdefault(case["id"], dict(
                        length=n, prompt_ids=case["prompt_ids"], scores=scores, budgets={}))
                    if entry["scores"] != scores:  # scores do not depend on the budget
                        raise AssertionError(f"{case['id']}: kvpress scores changed with budget")
                    entry["budgets"][key] = [[encode_positions(h, n) for h in heads]
                                             for heads in kept]
            if verified.get(n, 0) < verify_per_length:
                verified[n] = verified.get(n, 0) + 1
                checks.append(_check_one_prefill_per_budget(model, ids, fan, answers, max_new,
                                                            eos, case["id"]))
            out_cases.append(row)
            log(f"[kvpress] {case['id']} N={n} answer={case['answer']} full={row['full']!r} "
                + " ".join(f"b{k}={'ok' if v else 'x'}" for k, v in row["correct"].items())
                + f" prefill {row['prefill_s']['all']:.2f}s"
                + f" ({time.perf_counter() - started:.0f}s)")

    accuracy = {length: {k: dict(correct=sum(v), total=len(v), accuracy=sum(v) / len(v))
                         for k, v in row.items()}
                for length, row in _cells(out_cases, "correct").items()}
    prefill = {length: {k: round(statistics.fmean(v), 4) for k, v in row.items()}
               for length, row in _cells(out_cases, "prefill_s").items()}
    meta = dict(
        model=model_path, dtype="float32", attn_implementation="sdpa",
        kvpress_version=version("kvpress"), transformers_version=version("transformers"),
        torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
        press=dict(cls="SnapKVPress", window_size=window, kernel_size=defaults.kernel_size,
                   compression_ratio="1 - budget / length"),
        budgets=budgets, max_new_tokens=max_new,
        one_prefill_per_case=("every budget's SnapKVPress.compress runs on the same prefill "
                              "(see _fanout_press); checked against one prefill per budget"),
        equivalence_checks=checks, prompt="raw token ids: no BOS, no chat template",
        kept_encoding=KEPT_ENCODING, seconds=round(time.perf_counter() - started, 1),
        notes=[f"budgets <= {window} (kvpress's window) keep only the observation window",
               "budgets >= the prompt length are not run (nothing to compress: see 'full')"],
    )
    return dict(meta=meta, cases=out_cases, accuracy=accuracy,
                prefill_s=prefill, kept=kept_out)


def run_subprocess(spec: dict, out: Path, spec_path: Path | None = None,
                   module: str = "benchmarks.kvpress_runner") -> dict:
    """From any Python (e.g. the main venv): run ``spec`` in kvpress's venv (``python -m
    <module>`` from the repository root), write ``out``, and return the report. The spec is
    written to ``spec_path`` (default ``<out stem>.spec.json`` next to ``out``)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = Path(spec_path or out.with_name(out.stem + ".spec.json")).resolve()
    spec_path.write_text(json.dumps(spec))
    subprocess.run([str(kvpress_python()), "-m", module, "--spec", str(spec_path), "--out",
                    str(out)], env=kvpress_env(), cwd=REPO, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kvpress_runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="input JSON (see the module docstring)")
    parser.add_argument("--out", default=str(REPO / "results" / "kvpress_needle.json"))
    args = parser.parse_args(argv)
    ensure_kvpress_python("benchmarks.kvpress_runner", argv)
    report = run(json.loads(Path(args.spec).read_text()),
                 log=lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report))
    for length, row in report["accuracy"].items():
        print(f"N={length}: " + ", ".join(f"{k}: {v['correct']}/{v['total']}"
                                          for k, v in row.items()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
