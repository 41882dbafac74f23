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
  optional routing ``scores`` to fuse the weighted combine of a MoE block.

mlx-lm is not needed to use these layers.
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_moe_kernels.ops import gather_mm, switch_glu

__all__ = ["SwiGLU", "SwitchLinear", "SwitchGLU", "SwitchMLP"]

# Where mlx-lm defines its SwiGLU activation module, which we treat as our
# default activation (looked up in sys.modules only: if a model holds an
# instance, the module is loaded, and mlx-lm never becomes a dependency).
_MLX_LM_SWITCH_LAYERS = "mlx_lm.models.switch_layers"


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
        self, group_size: int = 64, bits: int = 4, mode: str = "affine", global_scale: bool = False
    ) -> nn.Module:
        """The quantized layer ``nn.quantize`` swaps in: mlx-lm's
        ``QuantizedSwitchLinear`` (needs mlx-lm) with this layer's weights
        quantized and its bias kept. A ``SwitchGLU`` holding quantized
        projections computes with them through the unfused path."""
        try:
            from mlx_lm.models.switch_layers import QuantizedSwitchLinear
        except ImportError as error:  # pragma: no cover - mlx-lm is a test dependency
            raise ImportError("Quantizing a SwitchLinear needs mlx-lm's QuantizedSwitchLinear.") from error
        num_experts, output_dims, input_dims = self.weight.shape
        quantized = QuantizedSwitchLinear(
            input_dims, output_dims, num_experts, False, group_size, bits, mode=mode
        )
        quantized._quantize(self.weight, global_scale)
        if "bias" in self:
            quantized.bias = self.bias
        return quantized


class SwitchGLU(nn.Module):
    """The experts of a gated-MLP Mixture-of-Experts layer: per token and
    selected expert, ``down(activation(up(x), gate(x)))``.

    Same constructor, parameters (``gate_proj``, ``up_proj``, ``down_proj``,
    each a :class:`SwitchLinear`) and outputs as mlx-lm's ``SwitchGLU``.
    With the default SwiGLU activation (ours or mlx-lm's ``SwiGLU``) and no
    bias, the call is one fused :func:`~mlx_moe_kernels.switch_glu` op;
    otherwise (another activation, biases, or projections replaced by other
    modules such as quantized ones) it is composed from the projections,
    with the same result as mlx-lm.

    Args:
        input_dims: Model dimension ``D``.
        hidden_dims: Expert hidden dimension ``H``.
        num_experts: Number of experts ``E``.
        activation: Called as ``activation(up, gate)``; ``None`` (the
            default) is :class:`SwiGLU`.
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
        activation, and plain :class:`SwitchLinear` projections without
        bias."""
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        return is_default_activation(self.activation) and all(
            type(p) is SwitchLinear and "bias" not in p for p in projections
        )

    def __call__(self, x: mx.array, indices: mx.array, scores: Optional[mx.array] = None) -> mx.array:
        """Apply the experts ``indices`` (``[..., k]``) selects to the tokens
        ``x`` (``[..., D]``).

        Returns ``[..., k, D]``, one output per selected expert (as
        mlx-lm's ``SwitchGLU``), or, with ``scores`` (``[..., k]``), their
        weighted sum ``(y * scores[..., None]).sum(-2)``, ``[..., D]``.
        The indices get no gradient.
        """
        indices = mx.stop_gradient(indices)
        if self.uses_fused_kernel() and indices.shape[:-1] == x.shape[:-1]:
            return switch_glu(
                x,
                self.gate_proj["weight"],
                self.up_proj["weight"],
                self.down_proj["weight"],
                indices,
                scores,
            )
        rows = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]
        up = self.up_proj(rows, indices)  # [..., k, 1, H]
        gate = self.gate_proj(rows, indices)
        out = self.down_proj(self.activation(up, gate), indices).squeeze(-2)
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
