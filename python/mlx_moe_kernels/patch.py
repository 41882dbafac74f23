"""Swap mlx-lm's ``SwitchGLU`` layers in a model for ours, in place.

What :func:`patch` changes:

* Every module whose type is exactly mlx-lm's
  ``mlx_lm.models.switch_layers.SwitchGLU`` whose three projections our
  kernels can compute is replaced by our
  :class:`~mlx_moe_kernels.layers.SwitchGLU`, holding the very same arrays -
  nothing is copied - and the same activation. A projection our kernels can
  compute is

  - a plain mlx-lm ``SwitchLinear``: it becomes our
    :class:`~mlx_moe_kernels.layers.SwitchLinear` holding its ``weight``
    (and ``bias``);
  - an mlx-lm ``QuantizedSwitchLinear`` (what ``nn.quantize``, mlx-lm's
    ``convert -q`` and its loader make of a ``SwitchLinear``) in a format of
    our quantized kernels - ``"affine"`` (group size 32, 64 or 128; 1, 2, 3,
    4, 5, 6 or 8 bits) or ``"mxfp4"`` (group size 32, 4 bits) - without an
    nvfp4 per-expert ``global_scale``: it becomes our
    :class:`~mlx_moe_kernels.layers.QuantizedSwitchLinear` holding its
    ``weight``, ``scales``, ``biases`` (and ``bias``) with the same
    ``group_size``, ``bits`` and ``mode``.

  Our layer runs the fused kernel when the activation is SwiGLU, there are
  no biases and the three projections are all float or all quantized with
  one format; otherwise - e.g. a mixed-precision recipe that quantizes
  ``down_proj`` with more bits, or a projection ``mlx_lm.convert`` left in
  float because its input size is not a multiple of the group size - it
  composes the projections, each on our ``gather_mm`` / ``gather_qmm``.
* The MoE blocks whose routing we reproduce - mlx-lm's
  ``qwen2_moe.Qwen2MoeSparseMoeBlock`` and ``qwen3_moe.Qwen3MoeSparseMoeBlock``
  (which ``qwen3_vl_moe`` also uses for its text model) - get, once their
  ``switch_mlp`` is ours, a subclass of their own class (set on the
  instance: the object, its attributes and its submodules stay the same)
  whose ``__call__`` passes the routing scores into the fused op, so the
  weighted combine happens inside the down-projection kernel instead of as
  ``(y * scores[..., None]).sum(-2)`` (float and quantized experts alike;
  where our layer is not on the fused path the block keeps that sum).
  Routing (softmax, top-k, ``norm_topk_prob``), the shared expert and its
  sigmoid gate, and the distributed hooks are reproduced as mlx-lm writes
  them.

* Every layer whose type is exactly MLX's ``nn.Linear``,
  ``nn.QuantizedLinear`` (affine or mxfp4), ``nn.Embedding`` or
  ``nn.QuantizedEmbedding`` - the attention projections, routers, shared
  experts and their gates, dense MLPs, the lm_head and a tied embedding -
  gets the matching subclass from :mod:`mlx_moe_kernels.dense` (set on the
  instance, like the blocks), which computes ``x @ W.T`` with our CPU
  kernels (MLX's matmul on a GPU). ``patch(model, dense_layers=False)``
  skips this.

What it leaves alone (as mlx-lm's, computing with ``mx.gather_qmm``): a
``SwitchGLU`` with any projection in a quantization format our kernels do
not take (``"nvfp4"``, ``"mxfp8"``, an nvfp4 ``global_scale``, other group
sizes or bits) or of another type (e.g. a LoRA wrapper). Also left alone:
subclasses of ``SwitchGLU`` (they may change its behaviour), ``SwitchMLP``
layers, modules inside tuples, and the MoE blocks of other architectures
(their ``SwitchGLU`` is still replaced, their combine is not fused). The
parameter names of the model do not change, so checkpoints load the same
before and after.

:func:`unpatch` puts back mlx-lm's original ``SwitchGLU`` objects, with
their original projection objects (holding the arrays our layers hold at
that time, so training or ``load_weights`` after patching carries over),
and the blocks' original classes.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_moe_kernels import dense
from mlx_moe_kernels.layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

__all__ = ["patch", "unpatch"]

_MLX_LM_SWITCH_LAYERS = "mlx_lm.models.switch_layers"
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------ traversal
def _child_slots(container: Any) -> Iterator[Tuple[Any, Any, Any]]:
    """(container, key, value) for each entry of a module, list or dict,
    where ``container[key] = new`` replaces the value (tuples are
    immutable and not entered)."""
    if isinstance(container, list):
        yield from ((container, i, v) for i, v in enumerate(container))
    elif isinstance(container, dict):  # nn.Module is a dict too
        yield from ((container, k, v) for k, v in list(container.items()))


def _walk(root: Any, visit: Callable[[Any, Any, Any], None]) -> None:
    """Post-order traversal of every module, list and dict under ``root``:
    ``visit(container, key, value)`` for each entry, after the entry's own
    entries have been visited (so a parent sees its children already
    replaced). Each object is entered once."""
    seen = set()

    def descend(container: Any) -> None:
        if id(container) in seen:
            return
        seen.add(id(container))
        for parent, key, value in _child_slots(container):
            if isinstance(value, (list, dict)):
                descend(value)
            visit(parent, key, value)

    descend(root)


# ------------------------------------------------------ SwitchGLU swap
class _Replaced:
    """The mlx-lm layer a patched ``SwitchGLU`` stands in for. A plain
    object, so ``nn.Module`` keeps it as an attribute, not a child: it adds
    no parameters to the model."""

    def __init__(self, original: nn.Module):
        self.original = original


_ORIGINAL_ATTR = "_mlx_moe_replaced"


def _mlx_lm_class(module_name: str, class_name: str) -> Optional[type]:
    """A class of an mlx-lm module if that module is already imported
    (a model holding its instances implies it is), else ``None``."""
    return getattr(sys.modules.get(module_name), class_name, None)


# (group sizes, bits) our gather_qmm / switch_glu kernels take, per mode
# (the modes of layers.KERNEL_QUANT_MODES; see ops.gather_qmm).
_KERNEL_QUANT_FORMATS: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    "affine": ((32, 64, 128), (1, 2, 3, 4, 5, 6, 8)),
    "mxfp4": ((32,), (4,)),
}


def _their_quantization(linear: nn.Module) -> Tuple[int, int, str]:
    """``(group_size, bits, mode)`` of an mlx-lm ``QuantizedSwitchLinear``
    (mlx-lm versions before quantization modes are affine)."""
    return linear.group_size, linear.bits, getattr(linear, "mode", "affine")


def _kernel_projection(linear: Any) -> bool:
    """Whether ``linear`` is an mlx-lm ``SwitchLinear`` (exact type), or an
    mlx-lm ``QuantizedSwitchLinear`` (exact type) in a format our quantized
    kernels take and without an nvfp4 per-expert global scale."""
    if type(linear) is _mlx_lm_class(_MLX_LM_SWITCH_LAYERS, "SwitchLinear"):
        return True
    if type(linear) is not _mlx_lm_class(_MLX_LM_SWITCH_LAYERS, "QuantizedSwitchLinear"):
        return False
    if getattr(linear, "global_scale", None) is not None:
        return False
    group_size, bits, mode = _their_quantization(linear)
    if mode not in _KERNEL_QUANT_FORMATS:
        return False
    group_sizes, bit_widths = _KERNEL_QUANT_FORMATS[mode]
    return group_size in group_sizes and bits in bit_widths and "weight" in linear and "scales" in linear


def _replaceable(module: Any) -> bool:
    """An mlx-lm SwitchGLU (exact type) whose projections are all plain
    SwitchLinear or QuantizedSwitchLinear in a format of our kernels."""
    their_glu = _mlx_lm_class(_MLX_LM_SWITCH_LAYERS, "SwitchGLU")
    if their_glu is None or type(module) is not their_glu:
        return False
    return all(_kernel_projection(module.get(name)) for name in _PROJECTIONS)


def _copy_module_flags(source: nn.Module, target: nn.Module) -> None:
    """Carry the frozen parameter names and the training mode over."""
    target._no_grad = set(source._no_grad)
    target._training = source._training


def _ours_from(theirs: nn.Module) -> SwitchGLU:
    """Our SwitchGLU holding ``theirs``'s arrays and activation."""
    projections = []
    for name in _PROJECTIONS:
        their_linear = theirs[name]
        if type(their_linear) is _mlx_lm_class(_MLX_LM_SWITCH_LAYERS, "SwitchLinear"):
            ours_linear = SwitchLinear.from_weights(their_linear["weight"], their_linear.get("bias"))
        else:  # a QuantizedSwitchLinear in a format of our kernels
            group_size, bits, mode = _their_quantization(their_linear)
            ours_linear = QuantizedSwitchLinear.from_weights(
                their_linear["weight"],
                their_linear["scales"],
                their_linear.get("biases"),
                their_linear.get("bias"),
                group_size=group_size,
                bits=bits,
                mode=mode,
            )
        _copy_module_flags(their_linear, ours_linear)
        projections.append(ours_linear)
    ours = SwitchGLU.from_projections(*projections, activation=theirs.activation)
    _copy_module_flags(theirs, ours)
    setattr(ours, _ORIGINAL_ATTR, _Replaced(theirs))
    return ours


def _restored_from(ours: SwitchGLU) -> nn.Module:
    """The original mlx-lm layer, its original projections updated to hold
    ``ours``'s current arrays (or, where a projection was swapped for a
    module of another kind since, e.g. a float one quantized by
    ``nn.quantize`` after patching, that module)."""
    theirs = getattr(ours, _ORIGINAL_ATTR).original
    their_float = _mlx_lm_class(_MLX_LM_SWITCH_LAYERS, "SwitchLinear")
    their_quantized = _mlx_lm_class(_MLX_LM_SWITCH_LAYERS, "QuantizedSwitchLinear")
    for name in _PROJECTIONS:
        current, their_linear = ours[name], theirs[name]
        if type(current) is SwitchLinear and type(their_linear) is their_float:
            their_linear.weight = current["weight"]
        elif type(current) is QuantizedSwitchLinear and type(their_linear) is their_quantized:
            their_linear.weight = current["weight"]
            their_linear.scales = current["scales"]
            their_linear.biases = current.get("biases")  # None: not a parameter
            their_linear.group_size, their_linear.bits, their_linear.mode = current.quantization
        else:
            theirs[name] = current
            continue
        if "bias" in current:
            their_linear.bias = current["bias"]
        elif "bias" in their_linear:
            del their_linear["bias"]
        _copy_module_flags(current, their_linear)
    theirs.activation = ours.activation
    _copy_module_flags(ours, theirs)
    return theirs


# ------------------------------------------------- fused MoE combines
def _expert_output_dtype(experts: SwitchGLU, x: mx.array) -> mx.Dtype:
    """The dtype of ``experts(x, inds)`` (mlx-lm's ``y``): ``x`` promoted
    with the float weights, or with the scales and biases of affine
    quantized ones (other quantization modes keep ``x``'s dtype)."""
    arrays = []
    for name in _PROJECTIONS:
        projection = experts[name]
        if isinstance(projection, QuantizedSwitchLinear):
            if projection.mode == "affine":
                arrays += [a for a in (projection["scales"], projection.get("biases")) if a is not None]
        else:
            arrays.append(projection["weight"])
    return mx.result_type(x, *arrays)


def _combined_experts(
    experts: nn.Module, x: mx.array, inds: mx.array, scores: mx.array, keep_expert_dtype: bool
) -> mx.array:
    """``sum_j scores[..., j] * experts(x, inds)[..., j, :]``: inside the
    fused kernel when ``experts`` is our SwitchGLU on its fused path, else
    mlx-lm's formula. With ``keep_expert_dtype`` the sum is cast to the
    dtype of the experts' output (as Qwen3-MoE does), else it has the
    promoted dtype of that and the scores (as Qwen2-MoE)."""
    if isinstance(experts, SwitchGLU) and experts.uses_fused_kernel():
        combined = experts(x, inds, scores)
        if keep_expert_dtype:
            combined = combined.astype(_expert_output_dtype(experts, x))
        return combined
    y = experts(x, inds)
    combined = (y * scores[..., None]).sum(axis=-2)
    return combined.astype(y.dtype) if keep_expert_dtype else combined


def _qwen3_moe_fused_call(self, x: mx.array) -> mx.array:
    """Qwen3-MoE sparse block (mlx-lm's routing) with the fused combine."""
    sharding_group = getattr(self, "sharding_group", None)
    if sharding_group is not None:
        from mlx.nn.layers.distributed import sum_gradients

        x = sum_gradients(sharding_group)(x)
    gates = mx.softmax(self.gate(x), axis=-1, precise=True)
    top_k = self.top_k
    inds = mx.stop_gradient(mx.argpartition(gates, kth=-top_k, axis=-1)[..., -top_k:])
    scores = mx.take_along_axis(gates, inds, axis=-1)
    if self.norm_topk_prob:
        scores = scores / mx.sum(scores, axis=-1, keepdims=True)
    y = _combined_experts(self.switch_mlp, x, inds, scores, keep_expert_dtype=True)
    if sharding_group is not None:
        y = mx.distributed.all_sum(y, group=sharding_group)
    return y


def _qwen2_moe_fused_call(self, x: mx.array) -> mx.array:
    """Qwen2-MoE sparse block (mlx-lm's routing, shared expert with its
    sigmoid gate) with the fused combine."""
    gates = mx.softmax(self.gate(x), axis=-1, precise=True)
    top_k = self.top_k
    inds = mx.stop_gradient(mx.argpartition(-gates, kth=top_k - 1, axis=-1)[..., :top_k])
    scores = mx.take_along_axis(gates, inds, axis=-1)
    y = _combined_experts(self.switch_mlp, x, inds, scores, keep_expert_dtype=False)
    shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
    return y + shared


# (mlx-lm module, block class name) -> the fused __call__ for it.
_KNOWN_BLOCKS: Dict[Tuple[str, str], Callable] = {
    ("mlx_lm.models.qwen3_moe", "Qwen3MoeSparseMoeBlock"): _qwen3_moe_fused_call,
    ("mlx_lm.models.qwen2_moe", "Qwen2MoeSparseMoeBlock"): _qwen2_moe_fused_call,
}
_FUSED_BLOCK_CLASSES: Dict[type, type] = {}  # mlx-lm block class -> our subclass


def _fused_block_class(block: nn.Module) -> Optional[type]:
    """Our subclass for a known mlx-lm block (exact type), else ``None``."""
    block_type = type(block)
    if block_type in _FUSED_BLOCK_CLASSES:
        return _FUSED_BLOCK_CLASSES[block_type]
    for (module_name, class_name), fused_call in _KNOWN_BLOCKS.items():
        if block_type is _mlx_lm_class(module_name, class_name):
            fused = type(
                "Fused" + class_name,
                (block_type,),
                {
                    "__call__": fused_call,
                    "__doc__": f"mlx-lm's {class_name} with the score-weighted combine "
                    "fused into mlx_moe_kernels' switch_glu (set by mlx_moe_kernels.patch).",
                    "__module__": __name__,
                },
            )
            _FUSED_BLOCK_CLASSES[block_type] = fused
            return fused
    return None


def _fuse_block(module: Any) -> None:
    """Give a known mlx-lm MoE block whose experts are our SwitchGLU the
    fused-combine subclass of its class (others are left as they are)."""
    if isinstance(module, nn.Module) and isinstance(module.get("switch_mlp"), SwitchGLU):
        fused_class = _fused_block_class(module)
        if fused_class is not None:
            module.__class__ = fused_class


def _unfuse_block(module: Any) -> None:
    """Give a block :func:`_fuse_block` changed its original class back."""
    if type(module) in _FUSED_BLOCK_CLASSES.values():
        module.__class__ = type(module).__bases__[0]


# ------------------------------------------------------- dense layers
# MLX's dense layer class -> ours (a subclass that only changes how the
# product is computed, so the instance keeps its arrays and attributes).
_DENSE_CLASSES = {
    nn.Linear: dense.Linear,
    nn.QuantizedLinear: dense.QuantizedLinear,
    nn.Embedding: dense.Embedding,
    nn.QuantizedEmbedding: dense.QuantizedEmbedding,
}
_DENSE_PATCHED_ATTR = "_mlx_moe_dense_patched"


def _patch_dense(module: Any) -> None:
    """Give an exact MLX ``Linear``/``QuantizedLinear``/``Embedding``/
    ``QuantizedEmbedding`` our subclass (set on the instance, as for the
    blocks: no array is copied). Quantized layers in a mode our kernels do
    not take are left alone."""
    ours = _DENSE_CLASSES.get(type(module))
    if ours is None:
        return
    if "scales" in module and module.mode not in dense.KERNEL_QUANT_MODES:
        return
    module.__class__ = ours
    object.__setattr__(module, _DENSE_PATCHED_ATTR, True)


def _unpatch_dense(module: Any) -> None:
    """Give a layer :func:`_patch_dense` changed its MLX class back."""
    if isinstance(module, nn.Module) and module.__dict__.pop(_DENSE_PATCHED_ATTR, False):
        module.__class__ = type(module).__bases__[0]


# ---------------------------------------------------------- public API
def patch(model: nn.Module, *, fuse_combine: bool = True, dense_layers: bool = True) -> int:
    """Replace mlx-lm's ``SwitchGLU`` layers in ``model`` by ours, in place:
    float experts and experts quantized in a format of our kernels
    (``"affine"``, ``"mxfp4"``).

    See the module docstring for exactly what is and is not replaced. The
    patched model computes the same logits as before (to float rounding:
    ours rounds fewer intermediates) with the same parameters, which it
    shares with the original layers.

    Args:
        model: Any ``mlx.nn.Module`` (a whole mlx-lm model or a part; a
            ``SwitchGLU`` passed as ``model`` itself has no parent to be
            replaced in and is left alone, a MoE block is patched).
        fuse_combine: Also patch the known Qwen MoE blocks so the routing
            scores' weighted sum runs inside the fused kernel.
        dense_layers: Also compute MLX's ``nn.Linear``, ``nn.QuantizedLinear``
            (affine, mxfp4), ``nn.Embedding`` and ``nn.QuantizedEmbedding``
            layers (attention projections, routers, shared experts, the
            lm_head, tied or not) with :mod:`mlx_moe_kernels.dense` (our
            CPU kernels; MLX's matmul on a GPU). Only exact MLX classes
            are changed, on the instance; the arrays are the same.

    Returns:
        The number of ``SwitchGLU`` layers replaced (float and quantized);
        0 when there is none left to replace (a second ``patch`` is a no-op;
        layers with a quantization format our kernels do not take are
        skipped).
    """
    replaced = 0

    def visit(container: Any, key: Any, value: Any) -> None:
        nonlocal replaced
        if _replaceable(value):
            container[key] = _ours_from(value)
            replaced += 1
        else:
            if fuse_combine:
                _fuse_block(value)
            if dense_layers:
                _patch_dense(value)

    _walk(model, visit)
    if fuse_combine:
        _fuse_block(model)
    if dense_layers:
        _patch_dense(model)
    return replaced


def unpatch(model: nn.Module) -> int:
    """Undo :func:`patch`: put back the original mlx-lm ``SwitchGLU`` layers
    and their projections (``SwitchLinear`` or ``QuantizedSwitchLinear``,
    holding the arrays their replacements hold now), the MoE blocks'
    original classes and the MLX classes of the dense layers it changed.

    Returns:
        The number of ``SwitchGLU`` layers restored.
    """
    restored = 0

    def visit(container: Any, key: Any, value: Any) -> None:
        nonlocal restored
        if isinstance(value, SwitchGLU) and hasattr(value, _ORIGINAL_ATTR):
            container[key] = _restored_from(value)
            restored += 1
        else:
            _unfuse_block(value)
            _unpatch_dense(value)

    _walk(model, visit)
    _unfuse_block(model)
    _unpatch_dense(model)
    return restored
