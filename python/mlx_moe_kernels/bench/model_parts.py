"""The parts of one decode step of a whole model, timed one by one, and the
bytes each must read.

A decode step reads every weight of the attention, the norms, the routers
and the output head once, the k of E routed experts of each MoE layer, one
row of the embedding, and the KV cache. :func:`decode_parts` splits a step
into:

* ``experts``: each MoE block's routed experts (``switch_mlp``): k/E of
  their bytes;
* ``router``: each MoE block's gate linear and its top-k softmax;
* ``shared_expert``: Qwen2-MoE's always-on expert and its sigmoid gate
  (only in models that have one);
* ``dense_mlp``: the layers with a dense MLP instead of a MoE block (only in
  models that have some);
* ``attn_proj``: the q, k, v and o projections;
* ``attention``: the per-head q/k norms, RoPE, the KV-cache update,
  scaled-dot-product attention and the layer's two RMSNorms (it reads those
  norms' weights and the cached keys and values);
* ``lm_head``: the final norm and the output head (the embedding matrix
  when the embeddings are tied);

and :func:`rest_bytes` counts what the rest of the step reads (one
embedding row; the rest also holds the residual adds, the argmax, building
the graph and MLX's per-evaluation overhead).

Each part is timed on saved one-token inputs for every layer at once (one
``mx.eval`` per timed call, as a step evaluates once), cycling through the
layers, after a :class:`~mlx_moe_kernels.bench.timing.CacheEvictor` pass;
the experts take the cache-cold routings of the cell benchmark (disjoint
sets of k experts), so every timed call reads its weights from memory, as a
step of a model whose weights exceed the caches does (DESIGN.md, "Benchmark
method").

The attention part repeats the steps of
:class:`mlx_moe_kernels.models.base.Attention` after its projections
(:func:`attention_core`): keep the two alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_moe_kernels import ops
from mlx_moe_kernels.bench.timing import CacheEvictor
from mlx_moe_kernels.bench.workloads import cache_cold_routings
from mlx_moe_kernels.models.base import KVCache, make_cache, route_topk

Work = Callable[[], List[mx.array]]
"""One timed call of a part: builds the part's outputs for every layer."""


@dataclass
class DecodePart:
    """One part of a decode step.

    Attributes:
        name: ``experts``, ``router``, ... (see the module docstring).
        bytes_read: Bytes the part must read in one step, over all layers.
        prepare: Call index -> the timed work of that call. Preparing (e.g.
            copying the KV caches the work extends) is not timed.
    """

    name: str
    bytes_read: float
    prepare: Callable[[int], Work]


def param_bytes(module: nn.Module) -> int:
    """Bytes of every parameter of ``module`` (quantized layers: packed
    codes, scales and biases)."""
    return sum(value.nbytes for _, value in tree_flatten(module.parameters()))


def language_model(model: nn.Module) -> nn.Module:
    """The causal language model inside ``model``: ``model`` itself, or its
    ``language_model`` (Qwen3-VL-MoE). It has ``.model`` (``embed_tokens``,
    ``layers``, ``norm``) and ``lm_head`` unless the embeddings are tied."""
    return getattr(model, "language_model", model)


def output_logits(lm: nn.Module, hidden: mx.array) -> mx.array:
    """The logits of final hidden states ``hidden``: ``lm_head``, or the
    tied embedding matrix."""
    if "lm_head" in lm:
        return lm.lm_head(hidden)
    return lm.model.embed_tokens.as_linear(hidden)


def output_head_bytes(lm: nn.Module) -> int:
    """Bytes of the final norm and the output head (tied: the embedding)."""
    head = lm.lm_head if "lm_head" in lm else lm.model.embed_tokens
    return param_bytes(lm.model.norm) + param_bytes(head)


def rest_bytes(lm: nn.Module) -> float:
    """Bytes the rest of a step reads: one row of the embedding."""
    embed = lm.model.embed_tokens
    return param_bytes(embed) / embed.weight.shape[0]


def attention_core(attn: nn.Module, q: mx.array, k: mx.array, v: mx.array, cache: KVCache) -> mx.array:
    """What :class:`~mlx_moe_kernels.models.base.Attention` computes after
    its q/k/v projections (``[B, L, heads * head_dim]`` each) and before
    ``o_proj``: q/k norms, RoPE at the cache's offset, the cache update and
    scaled-dot-product attention (no mask: one new position)."""
    B, L, _ = q.shape
    q = q.reshape(B, L, attn.num_heads, -1)
    k = k.reshape(B, L, attn.num_kv_heads, -1)
    v = v.reshape(B, L, attn.num_kv_heads, -1)
    if "q_norm" in attn:
        q = attn.q_norm(q)
        k = attn.k_norm(k)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    q = attn.rope(q, offset=cache.offset)
    k = attn.rope(k, offset=cache.offset)
    k, v = cache.update_and_fetch(k, v)
    out = ops.scaled_dot_product_attention(q, k, v, scale=attn.scale, mask=None)
    return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


def context_caches(lm: nn.Module, positions: int, seed: int) -> List[KVCache]:
    """Per-layer KV caches holding ``positions`` positions of a random
    prompt (evaluated)."""
    caches = make_cache(lm)
    if positions:
        vocab = lm.model.embed_tokens.weight.shape[0]
        rng = np.random.default_rng(seed)
        tokens = mx.array(rng.integers(0, vocab, (1, positions)).astype(np.int32))
        mx.eval(lm.model(tokens, caches))
        mx.eval([[c.keys, c.values] for c in caches])
    return caches


def _copy_cache(cache: KVCache) -> KVCache:
    copy = KVCache()
    if cache.keys is not None:
        copy.keys, copy.values = mx.array(cache.keys), mx.array(cache.values)
        copy.offset = cache.offset
    return copy


def _norm_bytes(layer: nn.Module) -> int:
    """Bytes of a decoder layer's two RMSNorms and its attention's q/k norms."""
    attn = layer.self_attn
    qk_norms = [attn[name] for name in ("q_norm", "k_norm") if name in attn]
    return sum(param_bytes(m) for m in [layer.input_layernorm, layer.post_attention_layernorm, *qk_norms])


def decode_parts(lm: nn.Module, context_positions: int, seed: int = 0) -> List[DecodePart]:
    """The parts of a decode step of ``lm`` (see the module docstring) at
    ``context_positions`` cached positions, on saved random one-token
    inputs in the model's activation dtype."""
    layers = lm.layers
    dtype = lm.model.norm.weight.dtype
    hidden = lm.model.norm.weight.shape[0]
    key = mx.random.key(seed)
    x = mx.random.normal((1, 1, hidden), key=key).astype(dtype)
    caches = context_caches(lm, context_positions, seed)
    rng = np.random.default_rng(seed)
    parts: List[DecodePart] = []

    # Attention projections and the attention itself.
    attns = [layer.self_attn for layer in layers]
    qkv = [(a.q_proj(x), a.k_proj(x), a.v_proj(x)) for a in attns]
    mx.eval(qkv)
    attended = mx.random.normal(qkv[0][0].shape, key=mx.random.key(seed + 1)).astype(dtype)
    mx.eval(attended)  # the o_proj input: [1, 1, heads * head_dim]
    kv_bytes_per_position = sum(k.nbytes + v.nbytes for _, k, v in qkv)
    parts.append(DecodePart(
        "attn_proj",
        sum(param_bytes(a[name]) for a in attns for name in ("q_proj", "k_proj", "v_proj", "o_proj")),
        lambda call: lambda: [
            out for a in attns for out in (a.q_proj(x), a.k_proj(x), a.v_proj(x), a.o_proj(attended))
        ],
    ))

    def attention_work(call: int) -> Work:
        fresh = [_copy_cache(c) for c in caches]
        mx.eval([[c.keys, c.values] for c in fresh if c.keys is not None])

        def work() -> List[mx.array]:
            outs = []
            for layer, (q, k, v), cache in zip(layers, qkv, fresh):
                outs.append(layer.input_layernorm(x))
                outs.append(attention_core(layer.self_attn, q, k, v, cache))
                outs.append(layer.post_attention_layernorm(x))
            return outs

        return work

    parts.append(DecodePart(
        "attention",
        sum(_norm_bytes(layer) for layer in layers) + (context_positions + 1) * kv_bytes_per_position,
        attention_work,
    ))

    # The MLP side: routed experts, router, shared expert, dense MLPs.
    moe = [layer.mlp for layer in layers if "switch_mlp" in layer.mlp]
    dense = [layer.mlp for layer in layers if "switch_mlp" not in layer.mlp]
    if moe:
        # Call c routes layer i to set (c + i) mod sets of its cache-cold
        # routings: a layer's consecutive calls touch disjoint experts.
        routings = []
        for block in moe:
            E, k = block.switch_mlp.gate_proj.num_experts, block.top_k
            routings.append([mx.array(r.reshape(1, 1, k)) for r in cache_cold_routings(rng, 1, E, k)])
        scores = [
            mx.softmax(mx.random.normal((1, 1, b.top_k), key=mx.random.key(seed + 2)), axis=-1).astype(dtype)
            for b in moe
        ]
        mx.eval(routings, scores)
        parts.append(DecodePart(
            "experts",
            sum(param_bytes(b.switch_mlp) * b.top_k / b.switch_mlp.gate_proj.num_experts for b in moe),
            lambda call: lambda: [
                b.switch_mlp(x, r[(call + i) % len(r)], s)
                for i, (b, r, s) in enumerate(zip(moe, routings, scores))
            ],
        ))
        parts.append(DecodePart(
            "router",
            sum(param_bytes(b.gate) for b in moe),
            lambda call: lambda: [
                out for b in moe for out in route_topk(b.gate(x), b.top_k, b.norm_topk_prob)
            ],
        ))
        shared = [b for b in moe if "shared_expert" in b]
        if shared:
            parts.append(DecodePart(
                "shared_expert",
                sum(param_bytes(b.shared_expert) + param_bytes(b.shared_expert_gate) for b in shared),
                lambda call: lambda: [
                    mx.sigmoid(b.shared_expert_gate(x)) * b.shared_expert(x) for b in shared
                ],
            ))
    if dense:
        parts.append(DecodePart(
            "dense_mlp", sum(param_bytes(m) for m in dense), lambda call: lambda: [m(x) for m in dense]
        ))

    parts.append(DecodePart(
        "lm_head", output_head_bytes(lm), lambda call: lambda: [output_logits(lm, lm.model.norm(x))]
    ))
    return parts


def time_parts(
    parts: Sequence[DecodePart], repeats: int, evictor: CacheEvictor
) -> Dict[str, List[float]]:
    """Seconds of each part's timed calls, by name: one untimed warm-up call
    each, then ``repeats`` rounds in which every part makes one call (parts
    interleaved, so a noisy moment spreads over them). Each call is timed
    around building its outputs and ``mx.eval``, after an eviction pass."""
    samples: Dict[str, List[float]] = {part.name: [] for part in parts}
    for call in range(repeats + 1):
        for part in parts:
            work = part.prepare(call)
            evictor.evict()
            start = time.perf_counter()
            mx.eval(work())
            mx.synchronize()
            elapsed = time.perf_counter() - start
            if call:  # call 0 warms up
                samples[part.name].append(elapsed)
    return samples
