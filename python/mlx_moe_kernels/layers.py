"""Drop-in Mixture-of-Experts layers on our kernels.

``SwitchLinear``, ``SwitchGLU`` and ``SwitchMLP`` take the constructor
arguments of mlx-lm's classes of the same names and hold parameters with
the same names, shapes and layouts (``weight`` ``[E, out, in]``, ``bias``
``[E, out]``), so mlx-lm checkpoints and ``load_weights`` work unchanged.
They return what mlx-lm's layers return. Differences:

* every expert matmul is our :func:`~mlx_moe_kernels.gather_mm` (which
  groups the rows by expert itself, so the layers never sort tokens);
* ``SwitchGLU`` with its default SwiGLU activation and no bias runs the
  fused :func:`~mlx_moe_kernels.switch_glu` op, and its ``__call__`` takes
  optional routing ``scores`` to fuse the weighted combine of a MoE block;
* ``QuantizedSwitchLinear`` (what ``nn.quantize`` turns a ``SwitchLinear``
  into) computes with our :func:`~mlx_moe_kernels.gather_qmm`, and a
  ``SwitchGLU`` whose three projections are quantized alike runs the fused
  op on the quantized weights.

mlx-lm is not needed to use these layers.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from mlx_moe_kernels import dispatch, ops, reference, verify
from mlx_moe_kernels.ops import gather_mm, switch_glu

__all__ = ["SwiGLU", "SwitchLinear", "QuantizedSwitchLinear", "SwitchGLU", "SwitchMLP"]

# Where mlx-lm defines its SwiGLU activation module, which we treat as our
# default activation (looked up in sys.modules only: if a model holds an
# instance, the module is loaded, and mlx-lm never becomes a dependency).
_MLX_LM_SWITCH_LAYERS = "mlx_lm.models.switch_layers"

# Quantization modes our gather_qmm / switch_glu kernels take; layers in
# other modes (nvfp4, mxfp8) compute with mx.gather_qmm instead.
KERNEL_QUANT_MODES = ("affine", "mxfp4")

# (group_size, bits) when nn.quantize passes None, per mode, as mlx.nn's
# quantized layers default them.
_QUANT_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


class SwiGLU(nn.Module):
    """The SwiGLU activation as ``SwitchGLU`` calls it:
    ``activation(up, gate) = silu(gate) * up`` (note the argument order,
    mlx-lm's), with ``silu(g) = g * sigmoid(g)``."""

    def __call__(self, up: mx.array, gate: mx.array) -> mx.array:
        """``silu(gate) * up``, element-wise, in the inputs' dtype."""
        return nn.silu(gate) * up


def is_default_activation(activation: Callable) -> bool:
    """Whether ``activation`` is plain SwiGLU, which the fused kernel
    computes itself: an instance of our :class:`SwiGLU` or of mlx-lm's
    ``SwiGLU`` (exact types; subclasses may change the function)."""
    if type(activation) is SwiGLU:
        return True
    mlx_lm_layers = sys.modules.get(_MLX_LM_SWITCH_LAYERS)
    mlx_lm_swiglu = getattr(mlx_lm_layers, "SwiGLU", None)
    return mlx_lm_swiglu is not None and type(activation) is mlx_lm_swiglu


class SwitchLinear(nn.Module):
    """A bank of ``num_experts`` linear layers applied per token to the
    expert(s) its indices select.

    Parameters: ``weight`` ``[num_experts, output_dims, input_dims]``
    (initialised uniform in ``+-1/sqrt(input_dims)``) and, with ``bias``,
    ``bias`` ``[num_experts, output_dims]`` (zeros), as mlx-lm's
    ``SwitchLinear``.

    Args:
        input_dims: Input features.
        output_dims: Output features.
        num_experts: Number of experts.
        bias: Whether to add a per-expert bias.
    """

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = True):
        super().__init__()
        bound = math.sqrt(1.0 / input_dims)
        self.weight = mx.random.uniform(
            low=-bound, high=bound, shape=(num_experts, output_dims, input_dims)
        )
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    @classmethod
    def from_weights(cls, weight: mx.array, bias: Optional[mx.array] = None) -> "SwitchLinear":
        """A layer holding the given arrays themselves (no copy, no random
        initialisation): ``weight`` ``[E, out, in]``, optional ``bias``
        ``[E, out]``."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.weight = weight
        if bias is not None:
            layer.bias = bias
        return layer

    @property
    def input_dims(self) -> int:
        """Input features (the last axis of ``weight``)."""
        return self.weight.shape[2]

    @property
    def output_dims(self) -> int:
        """Output features."""
        return self.weight.shape[1]

    @property
    def num_experts(self) -> int:
        """Number of experts."""
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """``x[i] @ weight[indices[i]].T (+ bias[indices[i]])`` over the
        broadcast batch of ``x`` (``[..., M, input_dims]``) and ``indices``,
        as mlx-lm's ``SwitchLinear``: returns ``[..., M, output_dims]``.
        ``sorted_indices`` is a hint only; results do not depend on it."""
        out = gather_mm(
            x, self["weight"].swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        if "bias" in self:
            out = out + mx.expand_dims(self["bias"][indices], -2)
        return out

    def to_quantized(
        self, group_size: Optional[int] = None, bits: Optional[int] = None, mode: str = "affine"
    ) -> "QuantizedSwitchLinear":
        """This layer's weights quantized (its bias kept): the
        :class:`QuantizedSwitchLinear` that ``nn.quantize`` swaps in.
        ``None`` group size or bits take the mode's defaults (affine: 64
        and 4)."""
        return QuantizedSwitchLinear.from_linear(self, group_size, bits, mode)


def _quant_params(group_size: Optional[int], bits: Optional[int], mode: str):
    """``(group_size, bits)`` with ``None`` replaced by ``mode``'s default."""
    if mode not in _QUANT_DEFAULTS:
        raise ValueError(f"unknown quantization mode {mode!r} (known: {', '.join(_QUANT_DEFAULTS)})")
    default_group_size, default_bits = _QUANT_DEFAULTS[mode]
    return group_size or default_group_size, bits or default_bits


class QuantizedSwitchLinear(nn.Module):
    """A :class:`SwitchLinear` with quantized weights (``mx.quantize``
    formats), as mlx-lm's ``QuantizedSwitchLinear``.

    Parameters, as mlx-lm names and shapes them: ``weight`` (uint32,
    ``[E, out, in * bits / 32]``), ``scales`` (``[E, out, in / group_size]``),
    ``biases`` (affine mode only, same shape) and, with ``bias``, ``bias``
    ``[E, out]``. All are frozen: the quantized weights have no gradient,
    while gradients still flow to the input (e.g. to LoRA layers around it).

    Args:
        input_dims: Input features (a multiple of ``group_size``).
        output_dims: Output features.
        num_experts: Number of experts.
        bias: Whether to add a per-expert (unquantized) bias.
        group_size: Quantization group size; ``None``: the mode's default.
        bits: Bits per weight; ``None``: the mode's default.
        mode: ``"affine"`` or ``"mxfp4"`` (our kernels), or another
            ``mx.quantize`` mode (computed with ``mx.gather_qmm``).
    """

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        bias: bool = True,
        group_size: Optional[int] = 64,
        bits: Optional[int] = 4,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits = _quant_params(group_size, bits, mode)
        self.mode = mode
        bound = math.sqrt(1.0 / input_dims)
        self._quantize(mx.random.uniform(low=-bound, high=bound, shape=(num_experts, output_dims, input_dims)))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    def _quantize(self, weight: mx.array) -> None:
        self.weight, self.scales, *biases = mx.quantize(weight, self.group_size, self.bits, mode=self.mode)
        self.biases = biases[0] if biases else None  # None: not a parameter

    @classmethod
    def from_linear(
        cls, layer: nn.Module, group_size: Optional[int] = None, bits: Optional[int] = None, mode: str = "affine"
    ) -> "QuantizedSwitchLinear":
        """``layer`` (ours or mlx-lm's ``SwitchLinear``: ``weight``
        ``[E, out, in]``, optional ``bias``) with its weights quantized and
        its bias array kept."""
        quantized = cls.__new__(cls)
        nn.Module.__init__(quantized)
        quantized.group_size, quantized.bits = _quant_params(group_size, bits, mode)
        quantized.mode = mode
        quantized._quantize(layer["weight"])
        if "bias" in layer:
            quantized.bias = layer["bias"]
        quantized.freeze()
        return quantized

    @classmethod
    def from_weights(
        cls,
        weight: mx.array,
        scales: mx.array,
        biases: Optional[mx.array] = None,
        bias: Optional[mx.array] = None,
        *,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ) -> "QuantizedSwitchLinear":
        """A layer holding the given quantized arrays themselves (no copy),
        e.g. those of an mlx-lm ``QuantizedSwitchLinear``."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group_size, layer.bits, layer.mode = group_size, bits, mode
        layer.weight, layer.scales, layer.biases = weight, scales, biases
        if bias is not None:
            layer.bias = bias
        layer.freeze()
        return layer

    @property
    def input_dims(self) -> int:
        """Input features (unpacked)."""
        return self.scales.shape[2] * self.group_size

    @property
    def output_dims(self) -> int:
        """Output features."""
        return self.weight.shape[1]

    @property
    def num_experts(self) -> int:
        """Number of experts."""
        return self.weight.shape[0]

    @property
    def quantization(self) -> Tuple[int, int, str]:
        """``(group_size, bits, mode)``."""
        return self.group_size, self.bits, self.mode

    def quantized_weights(self) -> Tuple[mx.array, mx.array, Optional[mx.array]]:
        """``(weight, scales, biases)`` as the quantized ops take them."""
        return self["weight"], self["scales"], self.get("biases")

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """``x[i] @ dequantize(weight[indices[i]]).T (+ bias[indices[i]])``,
        as mlx-lm's ``QuantizedSwitchLinear``: ``x`` ``[..., M, input_dims]``
        -> ``[..., M, output_dims]``. ``sorted_indices`` is a hint only."""
        gather_qmm = ops.gather_qmm if self.mode in KERNEL_QUANT_MODES else mx.gather_qmm
        out = gather_qmm(
            x, *self.quantized_weights(), rhs_indices=indices, transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices,
        )
        if "bias" in self:
            out = out + mx.expand_dims(self["bias"][indices], -2)
        return out


class SwitchGLU(nn.Module):
    """The experts of a gated-MLP Mixture-of-Experts layer: per token and
    selected expert, ``down(activation(up(x), gate(x)))``.

    Same constructor, parameters (``gate_proj``, ``up_proj``, ``down_proj``,
    each a :class:`SwitchLinear`) and outputs as mlx-lm's ``SwitchGLU``.
    With the default SwiGLU activation (ours or mlx-lm's ``SwiGLU``) and no
    bias, the call is one fused :func:`~mlx_moe_kernels.switch_glu` op, on
    float weights or, after ``nn.quantize``, on the quantized weights of
    three :class:`QuantizedSwitchLinear` projections with the same
    quantization (affine or mxfp4); otherwise (another activation, biases,
    mixed or other quantization, other modules) it is composed from the
    projections, with the same result as mlx-lm.

    Args:
        input_dims: Model dimension ``D``.
        hidden_dims: Expert hidden dimension ``H``.
        num_experts: Number of experts ``E``.
        activation: Called as ``activation(up, gate)``; ``None`` (the
            default) is :class:`SwiGLU`.
        bias: Whether the projections have per-expert biases.

    ``first_expert`` (``None``; set by expert-parallel sharding,
    :mod:`mlx_moe_kernels.sharding`): the projections then hold experts
    ``first_expert ..`` of a larger set, indices are ids in that set, and
    slots routed to experts outside the range contribute nothing (see
    :func:`~mlx_moe_kernels.switch_glu`).
    """

    first_expert: Optional[int] = None

    def __init__(
        self,
        input_dims: int,
        hidden_dims: int,
        num_experts: int,
        activation: Optional[Callable] = None,
        bias: bool = False,
    ):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts, bias=bias)
        self.activation = SwiGLU() if activation is None else activation

    @classmethod
    def from_projections(
        cls,
        gate_proj: nn.Module,
        up_proj: nn.Module,
        down_proj: nn.Module,
        activation: Optional[Callable] = None,
    ) -> "SwitchGLU":
        """A layer made of the given projection modules themselves (no copy,
        no random initialisation)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.gate_proj = gate_proj
        layer.up_proj = up_proj
        layer.down_proj = down_proj
        layer.activation = SwiGLU() if activation is None else activation
        return layer

    def uses_fused_kernel(self) -> bool:
        """Whether calls run the fused ``switch_glu`` op: default SwiGLU
        activation, and three projections without bias that are all plain
        :class:`SwitchLinear` or all :class:`QuantizedSwitchLinear` with
        the same quantization in a mode our kernels take."""
        return self._fused_quantization() is not False

    def _fused_quantization(self):
        """``False`` (unfused), ``None`` (fused, float weights) or the
        ``(group_size, bits, mode)`` of fused quantized projections."""
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if not is_default_activation(self.activation) or any("bias" in p for p in projections):
            return False
        if all(type(p) is SwitchLinear for p in projections):
            return None
        if all(type(p) is QuantizedSwitchLinear for p in projections):
            params = {p.quantization for p in projections}
            if len(params) == 1 and self.gate_proj.mode in KERNEL_QUANT_MODES:
                return params.pop()
        return False

    def __call__(self, x: mx.array, indices: mx.array, scores: Optional[mx.array] = None) -> mx.array:
        """Apply the experts ``indices`` (``[..., k]``) selects to the tokens
        ``x`` (``[..., D]``).

        Returns ``[..., k, D]``, one output per selected expert (as
        mlx-lm's ``SwitchGLU``), or, with ``scores`` (``[..., k]``), their
        weighted sum ``(y * scores[..., None]).sum(-2)``, ``[..., D]``.
        The indices get no gradient.
        """
        indices = mx.stop_gradient(indices)
        quantization = self._fused_quantization()
        if quantization is not False and indices.shape[:-1] == x.shape[:-1]:
            device = mx.default_device()
            if not verify.kernel_family_ok("switch_glu", device):
                # Our GPU kernels failed their first-use check (warned once).
                return self._stock(x, indices, scores, quantization)
            # Ours, unless the dispatch table says the composition is faster
            # for this shape class on this machine (see dispatch.py).
            choice = dispatch.choose(
                "switch_glu", self._dispatch_kind(x, quantization), x.size // max(x.shape[-1], 1),
                device, lambda: self._fused(x, indices, scores, quantization),
                lambda: self._stock(x, indices, scores, quantization),
            )
            if choice == "ours":
                return self._fused(x, indices, scores, quantization)
            return self._stock(x, indices, scores, quantization)
        return self._composed(x, indices, scores)

    @staticmethod
    def _dispatch_kind(x: mx.array, quantization) -> str:
        if quantization is None:
            return str(x.dtype).split(".")[-1]
        group_size, bits, mode = quantization
        return f"{str(x.dtype).split('.')[-1]} {mode} {bits}-bit g{group_size}"

    def _fused(self, x: mx.array, indices: mx.array, scores: Optional[mx.array], quantization) -> mx.array:
        """The fused op (float weights, or quantized with ``quantization``)."""
        if quantization is None:
            return switch_glu(
                x,
                self.gate_proj["weight"],
                self.up_proj["weight"],
                self.down_proj["weight"],
                indices,
                scores,
                first_expert=self.first_expert,
            )
        group_size, bits, mode = quantization
        return ops.switch_glu(
            x,
            self.gate_proj.quantized_weights(),
            self.up_proj.quantized_weights(),
            self.down_proj.quantized_weights(),
            indices,
            scores,
            group_size=group_size,
            bits=bits,
            mode=mode,
            first_expert=self.first_expert,
        )

    def _local_indices(self, indices: mx.array):
        """With an expert range (``first_expert``): the indices into this
        rank's experts (other ranks' slots read local expert 0) and the mask
        of slots that are this rank's; else ``(indices, None)``."""
        if self.first_expert is None:
            return indices, None
        local = indices.astype(mx.int64) - self.first_expert
        here = (local >= 0) & (local < self.down_proj["weight"].shape[0])
        return mx.where(here, local, 0).astype(mx.uint32), here

    def _stock(self, x: mx.array, indices: mx.array, scores: Optional[mx.array], quantization) -> mx.array:
        """MLX's own ops, as mlx-lm computes the layer
        (:func:`mlx_moe_kernels.reference.switch_glu`: ``mx.gather_mm`` /
        ``mx.gather_qmm``): what the dispatch table calls stock."""
        indices, here = self._local_indices(indices)
        weighted = scores if here is None or scores is None else scores * here.astype(scores.dtype)
        if quantization is None:
            weights = [p["weight"] for p in (self.gate_proj, self.up_proj, self.down_proj)]
            out = reference.switch_glu(x, *weights, indices, weighted)
        else:
            group_size, bits, mode = quantization
            weights = [p.quantized_weights() for p in (self.gate_proj, self.up_proj, self.down_proj)]
            out = reference.switch_glu(x, *weights, indices, weighted, group_size=group_size, bits=bits, mode=mode)
        if here is not None and scores is None:
            out = mx.where(here[..., None], out, 0)
        return out

    def _composed(self, x: mx.array, indices: mx.array, scores: Optional[mx.array]) -> mx.array:
        """mlx-lm's composition on the projections (any activation, biases,
        mixed quantization)."""
        indices, here = self._local_indices(indices)
        rows = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        up = self.up_proj(rows, indices)  # [..., k, 1, H]
        gate = self.gate_proj(rows, indices)
        out = self.down_proj(self.activation(up, gate), indices).squeeze(-2)
        if here is not None:
            out = mx.where(here[..., None], out, 0)
        if scores is None:
            return out
        return (out * scores[..., None]).sum(axis=-2)


class SwitchMLP(nn.Module):
    """The experts of a plain-MLP Mixture-of-Experts layer: per token and
    selected expert, ``fc2(activation(fc1(x)))``.

    Same constructor, parameters (``fc1``, ``fc2``, :class:`SwitchLinear`)
    and outputs as mlx-lm's ``SwitchMLP``.

    Args:
        input_dims: Model dimension ``D``.
        hidden_dims: Expert hidden dimension ``H``.
        num_experts: Number of experts ``E``.
        activation: Element-wise activation; ``None`` (the default) is
            ``nn.GELU(approx="precise")``.
        bias: Whether the projections have per-expert biases.
    """

    def __init__(
        self,
        input_dims: int,
        hidden_dims: int,
        num_experts: int,
        activation: Optional[Callable] = None,
        bias: bool = False,
    ):
        super().__init__()
        self.fc1 = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.fc2 = SwitchLinear(hidden_dims, input_dims, num_experts, bias=bias)
        self.activation = nn.GELU(approx="precise") if activation is None else activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """Apply the experts ``indices`` (``[..., k]``) selects to the tokens
        ``x`` (``[..., D]``); returns ``[..., k, D]``. The indices get no
        gradient."""
        indices = mx.stop_gradient(indices)
        rows = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        hidden = self.activation(self.fc1(rows, indices))
        return self.fc2(hidden, indices).squeeze(-2)
