"""Our models sharded over ``mx.distributed`` (MLX's own engine: the ring
backend over TCP, MPI, JACCL over Thunderbolt), launched with ``mlx.launch``.

Tensor parallelism, as far as it goes today:

- experts ``"tensor"``: every rank keeps ``H / n`` of every expert's hidden
  dimension (gate/up rows, down columns; Qwen2-MoE's shared expert and the
  dense MLP layers alike). A rank's MoE block then returns a partial sum of
  the block's output, routing scores and the shared expert's sigmoid gate
  already applied (both are replicated and act per token, so they commute
  with the sum), and one ``all_sum`` of ``[T, D]`` per block completes it.
- experts ``"expert"``: every rank keeps ``E / n`` whole routed experts
  (the router stays replicated). Its fused ``switch_glu`` gets the rank's
  expert range (``SwitchGLU.first_expert``) and routes the slots of other
  ranks' experts into a bucket no kernel visits: nothing is read or
  computed for them, and the rank returns the partial, score-weighted sum
  of its own experts. Qwen2-MoE's shared expert and dense MLP layers are cut
  by hidden dimension as in ``"tensor"``, so one ``all_sum`` per block
  still completes it. Each rank reads ``k / n`` experts per token on
  average (balanced routing), whole rows, instead of ``1 / n`` of each of
  the ``k``.
- attention ``"tensor"``: heads split across ranks (query heads and KV
  heads both divisible by ``n``), ``o_proj``'s input columns with them, one
  ``all_sum`` after ``o_proj``; ``"replicate"``: every rank runs the whole
  attention (no collective: better on slow links).

Pipeline parallelism (``model.pipeline(group)``): the decoder layers split
into ``n`` contiguous stages, one per rank (each rank keeps only its
layers); a rank receives the hidden state from the previous rank, runs its
layers and sends the result to the next (``send`` / ``recv`` reach
neighbours only on the ring backend, which is all a pipeline needs), and
the last stage's output is then shared with every rank by one ``all_sum``
(the other ranks add zeros), so every rank computes the same logits.

"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

EXPERT_MODES = ("tensor", "expert")
ATTENTION_MODES = ("tensor", "replicate")


def _language_model(model: nn.Module) -> nn.Module:
    """The decoder of a model (Qwen3-VL-MoE keeps it in ``language_model``)."""
    return model.language_model if "language_model" in model else model


def _copy(array: mx.array) -> mx.array:
    """An owned copy of a slice (an identity elementwise op writes a new
    buffer), so the full array can be freed: a slice of a row-major array
    would otherwise be a view keeping all of it alive."""
    if mx.issubdtype(array.dtype, mx.floating):
        return array * mx.array(1, dtype=array.dtype)
    return array + mx.array(0, dtype=array.dtype)


def _packed_columns(layer: nn.Module, count: int, what: str) -> int:
    """How many stored weight columns hold ``count`` input features."""
    bits = getattr(layer, "bits", None)
    if bits is None:
        return count
    group_size = layer.group_size
    if count % group_size or (count * bits) % 32:
        raise ValueError(
            f"cannot shard {what}: a rank's {count} input features are not a multiple of the "
            f"quantization group size {group_size}"
        )
    return count * bits // 32


def _slice_outputs(layer: nn.Module, start: int, stop: int) -> None:
    """Keep output features ``[start, stop)`` of a (quantized, switch) linear
    layer: rows of weight, scales, biases (axis -2) and of bias (axis -1)."""
    update = {}
    for name in ("weight", "scales", "biases"):
        if name in layer and layer[name] is not None:
            update[name] = _copy(layer[name][..., start:stop, :])
    if "bias" in layer:
        update["bias"] = _copy(layer["bias"][..., start:stop])
    layer.update(update)


def _slice_inputs(layer: nn.Module, start: int, stop: int, rank: int, what: str) -> None:
    """Keep input features ``[start, stop)``: weight columns (packed for a
    quantized layer), the matching scale/bias groups. An output bias is kept
    on rank 0 only (the all_sum adds it once)."""
    update = {}
    weight_start = _packed_columns(layer, start, what)
    weight_stop = _packed_columns(layer, stop, what)
    update["weight"] = _copy(layer["weight"][..., weight_start:weight_stop])
    if getattr(layer, "bits", None) is not None:
        group_size = layer.group_size
        for name in ("scales", "biases"):
            if name in layer and layer[name] is not None:
                update[name] = _copy(layer[name][..., start // group_size: stop // group_size])
    if "bias" in layer and rank != 0:
        update["bias"] = mx.zeros_like(layer["bias"])
    layer.update(update)


def _share(total: int, size: int, rank: int, what: str):
    if total % size:
        raise ValueError(f"cannot shard {what}: {total} is not divisible by the group size {size}")
    part = total // size
    return rank * part, (rank + 1) * part


def _sum_outputs(module: nn.Module, group) -> None:
    """Make ``module``'s calls return the all_sum of its output over ``group``
    (its class swapped for a subclass, so parameter paths stay the same)."""
    base = type(module)
    summed = _SUMMED_CLASSES.get(base)
    if summed is None:
        def __call__(self, *args, **kwargs):
            return mx.distributed.all_sum(base.__call__(self, *args, **kwargs), group=self._shard_group)

        summed = type(f"Summed{base.__name__}", (base,), {"__call__": __call__, "__doc__": base.__doc__})
        _SUMMED_CLASSES[base] = summed
    module.__class__ = summed
    module._shard_group = group


_SUMMED_CLASSES = {}


def _input_features(layer: nn.Module) -> int:
    columns = layer["weight"].shape[-1]
    bits = getattr(layer, "bits", None)
    return columns if bits is None else columns * 32 // bits


def _swiglus(mlp: nn.Module, what: str):
    """The (gate, up, down, name) SwiGLU triples of a layer's MLP block: the
    routed experts and Qwen2-MoE's shared expert, or a dense MLP."""
    if "switch_mlp" not in mlp:
        return [(mlp.gate_proj, mlp.up_proj, mlp.down_proj, f"{what} MLP")]
    experts = mlp.switch_mlp
    triples = [(experts.gate_proj, experts.up_proj, experts.down_proj, f"{what} experts")]
    if "shared_expert" in mlp:
        shared = mlp.shared_expert
        triples.append((shared.gate_proj, shared.up_proj, shared.down_proj, f"{what} shared expert"))
    return triples


def _hidden_share(down: nn.Module, size: int, rank: int, name: str):
    """Rank ``rank``'s hidden range of a SwiGLU (checked: divisible, and a
    whole number of quantization groups of ``down``'s input)."""
    hidden = _input_features(down)
    start, stop = _share(hidden, size, rank, f"{name} (hidden size {hidden})")
    _packed_columns(down, stop - start, f"{name} down projection")
    return start, stop


def _head_dim(attention: nn.Module, size: int, what: str) -> int:
    """The head dimension, after checking that the heads split over
    ``size`` ranks (and o_proj's input with them)."""
    heads, kv_heads = attention.num_heads, attention.num_kv_heads
    if heads % size or kv_heads % size:
        raise ValueError(
            f"cannot shard {what} attention by heads: {heads} query heads and {kv_heads} KV heads must both "
            f"be divisible by the group size {size} (use attention='replicate')"
        )
    head_dim = _input_features(attention.o_proj) // heads
    _packed_columns(attention.o_proj, head_dim * heads // size, f"{what} o_proj")
    return head_dim


def _expert_share(mlp: nn.Module, size: int, rank: int, what: str):
    """Rank ``rank``'s range of whole routed experts (checked: divisible)."""
    experts = mlp.switch_mlp.down_proj["weight"].shape[0]
    return _share(experts, size, rank, f"{what} experts by expert (num_experts {experts})")


def _by_expert(mlp: nn.Module, experts: str) -> bool:
    """Whether ``mlp``'s routed experts are split whole (expert parallelism)."""
    return experts == "expert" and "switch_mlp" in mlp


def _check_layer(layer: nn.Module, size: int, experts: str, attention: str, what: str) -> None:
    """The divisibility checks of one layer, without changing it."""
    for gate, _, down, name in _swiglus(layer.mlp, what):
        if _by_expert(layer.mlp, experts) and gate is layer.mlp.switch_mlp.gate_proj:
            _expert_share(layer.mlp, size, 0, what)
        else:
            _hidden_share(down, size, 0, name)
    if attention == "tensor":
        _head_dim(layer.self_attn, size, what)


def _slice_experts(layer: nn.Module, start: int, stop: int) -> None:
    """Keep experts ``[start, stop)`` of a (quantized) switch linear layer:
    the leading axis of weight, scales, biases and bias."""
    layer.update({
        name: _copy(layer[name][start:stop])
        for name in ("weight", "scales", "biases", "bias")
        if name in layer and layer[name] is not None
    })


def _shard_mlp(mlp: nn.Module, size: int, rank: int, experts: str, what: str) -> None:
    """The rank's slices of a sparse MoE block or a dense SwiGLU MLP:
    every SwiGLU cut along its hidden dimension, except, with ``experts ==
    "expert"``, the routed experts, of which the rank keeps whole experts
    (its ``switch_mlp`` then skips slots routed elsewhere)."""
    for gate, up, down, name in _swiglus(mlp, what):
        if _by_expert(mlp, experts) and gate is mlp.switch_mlp.gate_proj:
            start, stop = _expert_share(mlp, size, rank, what)
            for projection in (gate, up, down):
                _slice_experts(projection, start, stop)
            mlp.switch_mlp.first_expert = start
            continue
        start, stop = _hidden_share(down, size, rank, name)
        _slice_outputs(gate, start, stop)
        _slice_outputs(up, start, stop)
        _slice_inputs(down, start, stop, rank, f"{name} down projection")


def _shard_attention(attention: nn.Module, size: int, rank: int, what: str) -> None:
    head_dim = _head_dim(attention, size, what)
    heads, kv_heads = attention.num_heads // size, attention.num_kv_heads // size
    _slice_outputs(attention.q_proj, rank * heads * head_dim, (rank + 1) * heads * head_dim)
    _slice_outputs(attention.k_proj, rank * kv_heads * head_dim, (rank + 1) * kv_heads * head_dim)
    _slice_outputs(attention.v_proj, rank * kv_heads * head_dim, (rank + 1) * kv_heads * head_dim)
    _slice_inputs(attention.o_proj, rank * heads * head_dim, (rank + 1) * heads * head_dim, rank,
                  f"{what} o_proj")
    attention.num_heads = heads
    attention.num_kv_heads = kv_heads


def shard_model(model: nn.Module, group: Optional[mx.distributed.Group] = None, *, experts: str = "tensor",
                attention: str = "replicate") -> nn.Module:
    """Shard ``model`` (one of our Qwen2-MoE / Qwen3-MoE / Qwen3-VL-MoE
    models, float or quantized) in place over ``group`` (default:
    ``mx.distributed.init()``) and return it; see the module docstring for
    the modes. Every rank must call it with the same arguments, then run the
    same inputs; every rank gets the full output.

    Raises:
        ValueError: An unknown mode, or a dimension (expert hidden size,
            heads) not divisible by the group size or not a multiple of the
            quantization group size per rank, naming it. Nothing is
            changed when it raises (all checks run before any slicing).
    """
    if experts not in EXPERT_MODES:
        raise ValueError(f"experts must be one of {EXPERT_MODES}, got {experts!r}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    group = group if group is not None else mx.distributed.init()
    size, rank = group.size(), group.rank()
    if size == 1:
        return model
    if getattr(_language_model(model).model, "_pipeline_stage", None) is not None:
        raise ValueError("the model is pipelined; shard a fresh one")
    layers = _language_model(model).layers
    if any(hasattr(layer.mlp, "_shard_group") for layer in layers):
        raise ValueError("the model is already sharded; shard a fresh one")
    # Dry run on every rank first so a bad setup raises before any change
    # (and on every rank alike: no rank is left waiting in a collective).
    for index, layer in enumerate(layers):
        _check_layer(layer, size, experts, attention, f"layer {index}")
    for index, layer in enumerate(layers):
        if attention == "tensor":
            _shard_attention(layer.self_attn, size, rank, f"layer {index}")
            _sum_outputs(layer.self_attn, group)
        _shard_mlp(layer.mlp, size, rank, experts, f"layer {index}")
        _sum_outputs(layer.mlp, group)
        # Layer by layer: a lazily loaded model then holds one layer's full
        # tensors at a time, never the whole model.
        mx.eval(layer.parameters())
    return model


class _Stage:
    """This rank's pipeline stage (a plain object: nn.Module would take a
    tuple attribute for a child)."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size


def pipeline_model(model: nn.Module, group: Optional[mx.distributed.Group] = None) -> nn.Module:
    """Split ``model``'s decoder layers into contiguous pipeline stages over
    ``group`` (default: ``mx.distributed.init()``), in place: rank ``r``
    keeps stage ``r`` (the first ``L % n`` ranks one layer more), the
    embedding, final norm and head stay on every rank. Returns ``model``.

    Raises:
        ValueError: fewer layers than ranks, or a model already sharded.
    """
    group = group if group is not None else mx.distributed.init()
    size, rank = group.size(), group.rank()
    if size == 1:
        return model
    decoder = _language_model(model).model
    layers = decoder.layers
    if getattr(decoder, "_pipeline_stage", None) is not None or any(
        hasattr(layer.mlp, "_shard_group") for layer in layers
    ):
        raise ValueError("the model is already sharded or pipelined; build a fresh one")
    if len(layers) < size:
        raise ValueError(f"cannot split {len(layers)} decoder layers into {size} pipeline stages")
    base, extra = divmod(len(layers), size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    decoder.layers = layers[start:stop]
    decoder._pipeline_stage = _Stage(group, rank, size)
    return model


def run_layers(decoder: nn.Module, h: mx.array, mask, cache) -> mx.array:
    """The decoder layers over ``h`` (with their caches): all of them, or,
    pipelined, this rank's stage between the receive from the previous rank
    and the send to the next, the last stage's result shared by all."""
    stage = getattr(decoder, "_pipeline_stage", None)
    if stage is not None and stage.rank > 0:
        h = mx.distributed.recv_like(h, stage.rank - 1, group=stage.group)
    for layer, layer_cache in zip(decoder.layers, cache):
        h = layer(h, mask, layer_cache)
    if stage is None:
        return h
    if stage.rank < stage.size - 1:
        sent = mx.distributed.send(h, stage.rank + 1, group=stage.group)
        # Zeros that still depend on the send, so evaluating them sends.
        h = mx.where(mx.array(False), sent, mx.zeros_like(sent))
    return mx.distributed.all_sum(h, group=stage.group)


class Shardable:
    """Mixin of our models' ``Model`` classes: ``model.shard(...)``,
    ``model.pipeline(...)``."""

    def pipeline(self, group: Optional[mx.distributed.Group] = None):
        """:func:`pipeline_model` on this model; returns it."""
        return pipeline_model(self, group)

    def shard(self, group: Optional[mx.distributed.Group] = None, *, experts: str = "tensor",
              attention: str = "replicate"):
        """:func:`shard_model` on this model; returns it."""
        return shard_model(self, group, experts=experts, attention=attention)
