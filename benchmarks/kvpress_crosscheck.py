"""Cross-check: with the kvpress preset, our kept sets must equal NVIDIA kvpress 0.5.5 SnapKVPress's.

What runs: a Llama model (the bundled SmolLM2-135M-Instruct when present, else a random tiny
Llama with a fixed seed) does a real prefill under ``SnapKVPress(compression_ratio=cr)`` — kvpress's
own forward hooks score and prune every layer's cache. A subclass of ``SnapKVPress`` records, per
layer, the arguments kvpress's ``score()`` received and the scores it returned. From those we take:

* kvpress's kept positions: ``scores.topk(compute_n_kept(k_len, cr))`` — exactly what
  ``ScorerPress.compress`` does — and we *verify* they are what kvpress kept, by checking that
  kvpress's pruned cache equals the pre-compression keys gathered at those positions, bit for bit;
* the post-RoPE window queries, rebuilt with kvpress's own code path
  (``get_prerope_query_states`` + the RoPE of ``compute_window_attention``), and the keys.

Then ``vllm_snapkv.select_tokens_with_settings(Q_win, K, kvpress_preset(compression_ratio=cr))``
runs on the same tensors, and the kept sets are compared per layer and KV head. Differences are
classified by kvpress's own scores: an *exact tie* (equal score at the keep/evict boundary, which
kvpress's ``topk`` resolves arbitrarily and we resolve towards lower positions), a *near tie*
(within ``--near-tie-rtol`` of the boundary: fp32 rounding), or a real disagreement.

kvpress needs ``transformers<5.3``, so this runs in its own venv (``benchmarks/kvpress_env.sh``,
default ``.venv-kvpress``). Started with any other Python, the module creates that venv if needed
and re-executes itself there (``-m benchmarks.kvpress_crosscheck``), with this repository on
``PYTHONPATH`` (the selection core is pure torch; nothing here may import vLLM).

Usage (from the repository root)::

    python -m benchmarks.kvpress_crosscheck [--model PATH] [--out results/kvpress_crosscheck.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks import REPO
from benchmarks.kvpress_venv import ensure_kvpress_python

DEFAULT_MODEL = REPO / ".cache" / "models" / "smollm2-135m-instruct"


def _prompt_text() -> str:
    """Deterministic English prose (stdlib docstrings) long enough for several thousand tokens."""
    import inspect
    import importlib

    parts = []
    for name in ["collections", "functools", "itertools", "json", "re", "argparse", "logging",
                 "pathlib", "subprocess", "threading", "unittest", "typing", "dataclasses",
                 "decimal", "fractions", "statistics", "textwrap", "difflib", "heapq", "bisect"]:
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(parts)


def _load_model(model_path: str | None, seed: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if model_path and Path(model_path).is_dir():
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, attn_implementation="sdpa"
        )
        tok = AutoTokenizer.from_pretrained(model_path)
        ids = tok(_prompt_text(), return_tensors="pt").input_ids
        return model.eval(), ids, f"{model_path} (fp32, sdpa)"
    # Random tiny Llama with SmolLM2's attention shapes. Random weights attend almost uniformly
    # (every score ties with every other up to rounding), so q/k projections are scaled up to get
    # peaked, trained-model-like attention.
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, 8192), generator=gen)
    return model, ids, f"random tiny Llama (seed {seed}, 4 layers, 9/3 heads, head_dim 64)"


def run(args: argparse.Namespace) -> dict:
    import torch
    from importlib.metadata import version
    from kvpress import SnapKVPress
    from kvpress.utils import compute_n_kept, get_prerope_query_states
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import rotate_half

    from vllm_snapkv.methods.snapkv import window_scores
    from vllm_snapkv.selection import kept_count, select_tokens_with_settings
    from vllm_snapkv.settings import kvpress_preset

    torch.set_grad_enabled(False)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
    model, all_ids, model_desc = _load_model(args.model, args.seed)
    n_layers = model.config.num_hidden_layers

    class RecordingSnapKVPress(SnapKVPress):
        """SnapKVPress that keeps what score() saw and returned, per layer (nothing else changed)."""

        def __post_init__(self):
            super().__post_init__()
            self.records: dict[int, dict] = {}

        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            scores = super().score(module, hidden_states, keys, values, attentions, kwargs)
            w = self.window_size
            # post-RoPE window queries, exactly as SnapKVPress.compute_window_attention builds them
            q = get_prerope_query_states(module, hidden_states[:, -w:])
            cos, sin = kwargs["position_embeddings"]
            cos, sin = cos[:, -w:], sin[:, -w:]
            q = (q * cos.unsqueeze(1)) + (rotate_half(q) * sin.unsqueeze(1))
            self.records[module.layer_idx] = dict(
                queries=q[0].clone(), keys=keys[0].clone(), scores=scores[0].clone(),
                attentions_given=attentions is not None,
            )
            return scores

    results = []
    started = time.time()
    for n in args.lengths:
        if n > all_ids.shape[1]:
            print(f"skip N={n}: prompt text has only {all_ids.shape[1]} tokens")
            continue
        ids = all_ids[:, :n]
        for cr in args.compression_ratios:
            n_kept = compute_n_kept(n, cr)
            settings = kvpress_preset(compression_ratio=cr)
            entry = dict(n=n, compression_ratio=cr, kvpress_n_kept=n_kept,
                         our_kept=kept_count(n, settings))
            if n_kept <= settings.window:
                # kvpress would keep only part of its window (all tied at max + 1): outside
                # SnapKV's definition; our rule clamps to window + 1 instead. Not comparable.
                entry["skipped"] = f"kvpress n_kept={n_kept} <= window={settings.window}"
                results.append(entry)
                continue
            press = RecordingSnapKVPress(compression_ratio=cr)
            cache = DynamicCache()
            with press(model):
                model(ids, past_key_values=cache, use_cache=True)
            layers = []
            for li in range(n_layers):
                rec = press.records[li]
                assert not rec["attentions_given"], "expected kvpress to compute window attention"
                scores, keys, queries = rec["scores"], rec["keys"], rec["queries"]
                kv_idx = scores.topk(n_kept, dim=-1).indices  # ScorerPress.compress
                # prove these are kvpress's kept positions: its pruned cache is keys[kv_idx]
                pruned = cache.layers[li].keys[0]
                assert torch.equal(
                    pruned, keys.gather(1, kv_idx.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
                ), f"layer {li}: captured indices do not reproduce kvpress's pruned cache"
                kv_sorted = torch.sort(kv_idx, dim=-1).values
                tiles = {"auto": None}
                if args.tile_size:
                    tiles[f"tile={args.tile_size}"] = args.tile_size
                per_path = {}
                for label, tile in tiles.items():
                    ours = select_tokens_with_settings(queries, keys, settings, tile_size=tile)
                    our_scores = window_scores(queries, keys, settings, tile_size=tile)
                    heads = []
                    for h in range(keys.shape[0]):
                        a, b = set(ours[h].tolist()), set(kv_sorted[h].tolist())
                        row = scores[h, : n - settings.window]
                        info = dict(identical=a == b, n_diff=len(a ^ b))
                        if a != b:
                            kv_prefix = [i for i in b if i < n - settings.window]
                            boundary = float(min(row[i] for i in kv_prefix))
                            gaps = [abs(float(row[i]) - boundary) / abs(boundary) for i in a ^ b]
                            info.update(boundary=boundary, max_rel_gap=max(gaps),
                                        kind="exact_tie" if max(gaps) == 0.0 else
                                        "near_tie" if max(gaps) <= args.near_tie_rtol else
                                        "disagreement")
                        heads.append(info)
                    max_abs = float((our_scores - scores[:, : n - settings.window]).abs().max())
                    per_path[label] = dict(heads=heads, max_abs_score_diff=max_abs,
                                           scores_bitwise_equal=max_abs == 0.0)
                layers.append(per_path)
            entry["layers"] = layers
            results.append(entry)
            summary = {
                label: sum(h["identical"] for L in layers for h in L[label]["heads"])
                for label in layers[0]
            }
            total = sum(len(L["auto"]["heads"]) for L in layers)
            print(f"N={n:5d} cr={cr:.2f} n_kept={n_kept:5d}: identical kept sets "
                  + ", ".join(f"{k}: {v}/{total}" for k, v in summary.items())
                  + f"  ({time.time() - started:.0f}s)", flush=True)

    # summary
    by_path: dict[str, dict] = {}
    per_layer: dict[str, list] = {}
    for e in results:
        for li, L in enumerate(e.get("layers", [])):
            for label, p in L.items():
                s = by_path.setdefault(label, dict(heads=0, identical=0, exact_tie=0,
                                                   near_tie=0, disagreement=0,
                                                   max_abs_score_diff=0.0, bitwise_layers=0,
                                                   layers=0))
                pl = per_layer.setdefault(label, [[0, 0] for _ in range(n_layers)])
                s["layers"] += 1
                s["bitwise_layers"] += int(p["scores_bitwise_equal"])
                s["max_abs_score_diff"] = max(s["max_abs_score_diff"], p["max_abs_score_diff"])
                for h in p["heads"]:
                    s["heads"] += 1
                    pl[li][1] += 1
                    if h["identical"]:
                        s["identical"] += 1
                        pl[li][0] += 1
                    else:
                        s[h["kind"]] += 1
    summary = dict(
        model=model_desc,
        kvpress_version=version("kvpress"),
        transformers_version=version("transformers"),
        torch_version=torch.__version__,
        settings=kvpress_preset(compression_ratio=0.5).to_dict() | {"ratio": "1 - cr"},
        lengths=args.lengths,
        compression_ratios=args.compression_ratios,
        near_tie_rtol=args.near_tie_rtol,
        by_path={k: v | {"fraction_identical": v["identical"] / max(1, v["heads"])}
                 for k, v in by_path.items()},
        per_layer_fraction_identical={
            k: [round(a / b, 4) if b else None for a, b in v] for k, v in per_layer.items()
        },
        seconds=round(time.time() - started, 1),
    )
    print("\nkvpress 0.5.5 SnapKVPress vs vllm_snapkv (kvpress preset)")
    print(f"model: {model_desc}")
    for label, s in summary["by_path"].items():
        print(f"  [{label}] identical kept sets: {s['identical']}/{s['heads']} "
              f"({100 * s['fraction_identical']:.2f}%), exact ties: {s['exact_tie']}, "
              f"near ties: {s['near_tie']}, disagreements: {s['disagreement']}; "
              f"scores bitwise equal in {s['bitwise_layers']}/{s['layers']} layer runs, "
              f"max |score diff| {s['max_abs_score_diff']:.3g}")
    for label, fr in summary["per_layer_fraction_identical"].items():
        print(f"  [{label}] per layer: " + " ".join(f"{x:.3f}" if x is not None else "-" for x in fr))
    return dict(summary=summary, runs=results)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kvpress_crosscheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL) if DEFAULT_MODEL.is_dir() else None,
                        help="HF Llama folder (default: the bundled SmolLM2 if present, else a "
                             "random tiny Llama)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[300, 1000, 2500, 4000, 8000])
    parser.add_argument("--compression-ratios", type=float, nargs="+",
                        default=[0.25, 0.5, 0.75, 0.9])
    parser.add_argument("--tile-size", type=int, default=256,
                        help="also compare the tiled path with this tile (0: only the default)")
    parser.add_argument("--near-tie-rtol", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "results" / "kvpress_crosscheck.json"))
    args = parser.parse_args(argv)
    ensure_kvpress_python("benchmarks.kvpress_crosscheck", argv)
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    s = report["summary"]["by_path"]
    # exit status: 0 only when every compared head matched or differed solely at exact ties
    bad = sum(v["near_tie"] + v["disagreement"] for v in s.values())
    return 0 if s and bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
