"""NVIDIA kvpress 0.5.5 on the RULER-style tasks (``benchmarks.ruler``): the peer the accuracy
section compares the engine with, on the same token ids, with each question regime as kvpress
defines it.

* ``question`` (the question inside the observation window): the whole prompt is prefilled under
  the press, so the question's queries score the context, and the first token comes from that
  prefill's logits — what ``vllm serve`` does at the end of a prompt. (kvpress's own evaluation
  reaches this by appending the question to the context, ``query_aware``.)
* ``context`` (without the question): the context ``prompt_ids[:context_len]`` is prefilled under
  the press, then the question and the rest of the prompt are fed, uncompressed, on the pruned
  cache with their true positions, and decoding continues — what kvpress's
  ``KVPressTextGenerationPipeline`` does (it compresses the context, then reads the question).

Presses (kvpress's own classes, each at the kept count the engine keeps for the same case, regime
and ratio, passed in the spec so that block rounding is matched exactly): ``snapkv`` =
``SnapKVPress(window_size, kernel_size)`` at the engine's window and kernel, ``keydiff`` =
``KeyDiffPress``, ``knorm`` = ``KnormPress``, ``recency`` = ``StreamingLLMPress(n_sink)``. The
engine always keeps a method's last ``window`` positions; kvpress's KeyDiff and Knorm do not. To
measure what that difference is worth, ``keydiff+window`` and ``knorm+window`` run the same
kvpress scores with the last ``window`` positions forced into the kept set (as ``SnapKVPress``
does for its own window).

One prefill per case and regime serves every press (``kvpress_runner._fanout_press``: kvpress
compresses in a hook that runs after each layer's attention, so a press's input does not depend on
the others' pruning; that equivalence is checked against one prefill per press every run in
``kvpress_runner``).

Runs in kvpress's venv (``python -m benchmarks.kvpress_ruler --spec S --out O``; started with
another Python it re-executes itself there). Spec::

    {"model": path, "threads": int | null, "window": 32, "kernel": 15, "sink": 4,
     "presses": ["snapkv", "keydiff", "knorm", "recency", "keydiff+window", "knorm+window"],
     "cases": [ruler.Case.to_dict(), ...],
     "kept": {case_id: {"question": {ratio: kept}, "context": {ratio: kept}}}}

Output: ``{"meta": {...}, "rows": [{"id", "task", "length", "regime", "column", "correct",
"text"}]}`` where ``column`` is ``full`` or ``<press>@<ratio>x``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import kvpress_runner, ruler
from benchmarks.kvpress_runner import _decode, _fanout_press, load_model
from benchmarks.kvpress_venv import ensure_kvpress_python

PRESSES = ("snapkv", "keydiff", "knorm", "recency", "keydiff+window", "knorm+window")
REGIMES = ("question", "context")


def compression_ratio(kept: int, length: int) -> float:
    """kvpress ``compression_ratio`` whose ``int(length * (1 - cr))`` is exactly ``kept``."""
    cr = 1.0 - (kept + 0.5) / length
    if int(length * (1 - cr)) != kept:
        raise ValueError(f"no compression_ratio keeps {kept} of {length}")
    return cr


def make_press(name: str, cr: float, window: int, kernel: int, sink: int) -> Any:
    """kvpress's press for one of :data:`PRESSES` (``+window``: the last ``window`` positions
    forced into the kept set)."""
    import torch
    from kvpress import KeyDiffPress, KnormPress, SnapKVPress, StreamingLLMPress

    if name == "snapkv":
        return SnapKVPress(compression_ratio=cr, window_size=window, kernel_size=kernel)
    if name == "recency":
        return StreamingLLMPress(compression_ratio=cr, n_sink=sink)
    base = {"keydiff": KeyDiffPress, "knorm": KnormPress}[name.split("+")[0]]
    if not name.endswith("+window"):
        return base(compression_ratio=cr)

    class Windowed(base):  # kvpress's scores, the last `window` positions always kept
        def score(self, *args, **kwargs):
            scores = super().score(*args, **kwargs)
            scores = scores.clone()
            scores[..., -window:] = torch.finfo(scores.dtype).max
            return scores

    return Windowed(compression_ratio=cr)


def _forward(model, cache, ids: list[int], start: int) -> int:
    """Feed ``ids`` at positions ``start, start+1, ...`` on ``cache``; the greedy next token."""
    import torch

    pos = torch.arange(start, start + len(ids)).unsqueeze(0)
    logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, position_ids=pos,
                   logits_to_keep=1).logits
    return int(logits[0, -1].argmax())


def run(spec: dict, log: Callable[[str], None] = print) -> dict:
    import torch
    from importlib.metadata import version
    from transformers import DynamicCache

    model, tok, eos, model_path = load_model(spec)
    window, kernel, sink = int(spec["window"]), int(spec["kernel"]), int(spec["sink"])
    presses = list(spec.get("presses") or PRESSES)
    rows: list[dict] = []
    started = time.perf_counter()

    def row(case: ruler.Case, regime: str, column: str, tokens: list[int]) -> None:
        text = tok.decode(tokens, skip_special_tokens=True)
        rows.append(dict(id=case.id, task=case.task, length=case.length, regime=regime,
                         column=column, correct=ruler.is_correct(text, case.answers), text=text))

    with torch.inference_mode():
        for d in spec["cases"]:
            case = ruler.Case.from_dict(d)
            ids, a, n = case.prompt_ids, case.context_len, case.length
            for regime in REGIMES:
                kept = spec["kept"][case.id][regime]
                upto = n if regime == "question" else a
                fan = _fanout_press({
                    f"{p}@{r}x": make_press(p, compression_ratio(int(k), upto), window, kernel,
                                            sink)
                    for r, k in kept.items() for p in presses})
                cache = DynamicCache()
                with fan(model):
                    logits = model(input_ids=torch.tensor([ids[:upto]]), past_key_values=cache,
                                   logits_to_keep=1).logits
                first = int(logits[0, -1].argmax())
                caches = {"full": cache} | {key: fan.cache(key) for key in fan.presses}
                for key, c in caches.items():
                    if key != "full":
                        want = int(kept[key.split("@")[1][:-1]])
                        got = c.layers[0].keys.shape[2]
                        if got != want:
                            raise AssertionError(f"{case.id} {regime} {key}: kvpress kept {got}, "
                                                 f"the engine keeps {want}")
                    tok0 = first if regime == "question" else _forward(model, c, ids[a:], a)
                    tokens, _ = _decode(model, c, tok0, n, case.max_tokens, eos)
                    row(case, regime, key, tokens)
            done = [r for r in rows if r["id"] == case.id]
            log(f"[kvpress-ruler] {case.id} "
                + " ".join(f"{r['regime'][0]}:{r['column']}={'ok' if r['correct'] else 'x'}"
                           for r in done)
                + f" ({time.perf_counter() - started:.0f}s)")
    meta = dict(model=model_path, dtype="float32", attn_implementation="sdpa",
                kvpress_version=version("kvpress"), transformers_version=version("transformers"),
                torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                window=window, kernel=kernel, sink=sink, presses=presses,
                seconds=round(time.perf_counter() - started, 1))
    return dict(meta=meta, rows=rows)


def run_subprocess(spec: dict, out: Path) -> dict:
    """From the main venv: run ``spec`` in kvpress's venv, write ``out``, return the report."""
    return kvpress_runner.run_subprocess(spec, out, module="benchmarks.kvpress_ruler")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kvpress_ruler",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    ensure_kvpress_python("benchmarks.kvpress_ruler", argv)
    report = run(json.loads(Path(args.spec).read_text()),
                 log=lambda line: print(line, file=sys.stderr, flush=True))
    Path(args.out).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
