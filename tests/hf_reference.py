"""An independent reference run in plain HF transformers: post-RoPE queries and keys of a prompt.

The engine tests compare the tokens the plugin keeps inside vLLM with what the textbook SnapKV
formula (:mod:`snapkv_reference`) keeps when fed by HF transformers' own forward pass on the same
model and tokens. Nothing here imports the plugin: queries are rebuilt from each attention
layer's input with the layer's own ``q_proj`` and transformers' own ``apply_rotary_pos_emb``;
keys come from transformers' KV cache.
"""

from __future__ import annotations

from pathlib import Path

import torch


def prefill_qk(model_path: Path, token_ids: list[int], window: int,
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer: (queries of the last ``window`` positions ``[Hq, w, D]``, keys of all
    positions ``[Hkv, N, D]``), post-RoPE, float32, from one HF forward pass over the prompt."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.eval()
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn

        def hook(module, args, kwargs, output, i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            shape = (*hidden.shape[:-1], -1, module.head_dim)
            q = module.q_proj(hidden).view(shape).transpose(1, 2)
            k = module.k_proj(hidden).view(shape).transpose(1, 2)
            q, _ = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
            captured[i] = q[0, :, -window:].detach().clone()

        hooks.append(attn.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(torch.tensor([token_ids]), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    cache = out.past_key_values
    result = []
    for i in range(len(model.model.layers)):
        keys = cache.layers[i].keys[0].detach().clone()  # [Hkv, N, D]
        result.append((captured[i], keys))
    return result


def decode_with_compactions(model_path: Path, prompt: list[int], output: list[int],
                            compactions: list[tuple[int, int, int]], *, window: int,
                            keep_fn) -> list[tuple[int, list[list[list[int]]]]]:
    """Replay a request in plain HF transformers, compacting its KV cache at the same points.

    ``output`` (the engine's generated tokens) is teacher-forced, so both runs see the same
    tokens. ``compactions`` are ``(at, prior, evicted)``: once ``at`` tokens are processed, each
    layer's cache — exactly the slots ``[prior, at)`` — keeps, per KV head, the slots
    ``keep_fn(queries [Hq, w, D], keys [Hkv, at - prior, D], at - evicted)`` chooses (relative,
    sorted), where the queries are HF's post-RoPE queries of positions ``[at - w, at)``. New
    tokens get their true positions. Returns ``[(at, [layer][head] -> kept original
    positions)]``.
    """
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.models.llama import modeling_llama

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    model.eval()
    layers = model.model.layers
    recent: list[list[torch.Tensor]] = [[] for _ in layers]  # per layer: last queries [Hq, D]

    def hook(module, args, kwargs, out, i):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        q, _ = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        recent[i].extend(q[0, :, j].detach().clone() for j in range(q.shape[2]))
        del recent[i][:-window]

    hooks = [layer.self_attn.register_forward_hook(
        lambda m, a, kw, o, i=i: hook(m, a, kw, o, i), with_kwargs=True)
        for i, layer in enumerate(layers)]
    tokens = prompt + output[:-1]  # the last sampled token is never processed
    todo = sorted(compactions)
    cache = DynamicCache()
    positions = None  # per layer: [Hkv, slots] original positions of the cached slots
    results = []
    processed = 0
    try:
        with torch.no_grad():
            while processed < len(tokens):
                # Process up to the next compaction point in one forward (like the engine's
                # chunk cuts), or one token at a time during decode.
                stop = min(len(tokens), todo[0][0] if todo else len(tokens))
                if processed >= len(prompt):
                    stop = processed + 1
                ids = torch.tensor([tokens[processed:stop]])
                pos = torch.arange(processed, stop)[None, :]
                model(ids, position_ids=pos, past_key_values=cache, use_cache=True)
                if positions is None:
                    hkv = cache.layers[0].keys.shape[1]
                    positions = [torch.arange(stop).expand(hkv, -1) for _ in layers]
                else:
                    positions = [torch.cat([p, torch.arange(processed, stop).expand(p.shape[0],
                                                                                     -1)], 1)
                                 for p in positions]
                processed = stop
                while todo and todo[0][0] == processed:
                    at, prior, evicted = todo.pop(0)
                    kept_all = []
                    for i, layer_cache in enumerate(cache.layers):
                        keys, values = layer_cache.keys[0], layer_cache.values[0]
                        assert keys.shape[1] == at - prior, (keys.shape, at, prior)
                        q = torch.stack(recent[i], dim=1)  # [Hq, w, D]
                        kept = keep_fn(q, keys, at - evicted)  # [Hkv] lists, relative
                        idx = torch.tensor(kept)
                        gather = idx[:, :, None].expand(-1, -1, keys.shape[-1])
                        layer_cache.keys = torch.gather(keys, 1, gather)[None]
                        layer_cache.values = torch.gather(values, 1, gather)[None]
                        positions[i] = torch.gather(positions[i], 1, idx)
                        kept_all.append(positions[i].tolist())
                    results.append((at, kept_all))
    finally:
        for h in hooks:
            h.remove()
    return results
