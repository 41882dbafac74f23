"""Dense layers on our CPU kernels: drop-in subclasses of MLX's ``nn.Linear``,
``nn.QuantizedLinear``, ``nn.Embedding`` and ``nn.QuantizedEmbedding``.

Everything around the experts of a MoE model - the attention projections,
the router, a shared expert, dense MLP layers and the lm_head - is a dense
``x @ W.T``. MLX's CPU matmul runs it far below memory speed (a bfloat16
matrix-vector product ~12x below it, a quantized one on a single core, ~10x
slower still), so these layers route it through :func:`ops.linear` /
:func:`ops.quantized_linear`, our gather kernels over a single matrix. They
keep MLX's parameter names, constructor arguments and ``to_quantized``
behaviour (a quantized ``Linear`` becomes our ``QuantizedLinear``), so
checkpoints and ``nn.quantize`` work unchanged. On a GPU stream the ops are
MLX's own matmuls, so nothing changes there.

Quantization modes our kernels do not take (``"mxfp8"``, ``"nvfp4"``) fall
back to ``mx.quantized_matmul``.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_moe_kernels import ops

__all__ = ["Linear", "QuantizedLinear", "Embedding", "QuantizedEmbedding", "KERNEL_QUANT_MODES"]

# The quantization modes our quantized kernels compute.
KERNEL_QUANT_MODES = ("affine", "mxfp4")


def _quantized_product(layer: nn.Module, x: mx.array) -> mx.array:
    """``x @ W.T`` for a quantized layer (no layer bias)."""
    biases = layer.get("biases")
    if layer.mode in KERNEL_QUANT_MODES:
        return ops.quantized_linear(
            x, layer["weight"], layer["scales"], biases, layer.group_size, layer.bits, layer.mode
        )
    return mx.quantized_matmul(
        x, layer["weight"], scales=layer["scales"], biases=biases, transpose=True,
        group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
    )


def _quantize_into(layer: nn.Module, weight: mx.array, group_size, bits, mode: str) -> None:
    """Set ``layer``'s ``weight``/``scales``/``biases`` and format from a
    float ``weight`` (without the random initialisation MLX's constructors
    run, which costs as much as the quantization itself for an lm_head)."""
    layer.weight, layer.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
    layer.biases = biases[0] if biases else None
    layer.mode = mode
    # mx.quantize's defaults for the mode, read back from the shapes.
    layer.bits = bits if bits is not None else (layer.weight.shape[-1] * 32) // weight.shape[-1]
    layer.group_size = group_size if group_size is not None else weight.shape[-1] // layer.scales.shape[-1]


class Linear(nn.Linear):
    """``nn.Linear`` (``y = x @ weight.T + bias``) computed by
    :func:`mlx_moe_kernels.ops.linear`; ``to_quantized`` gives our
    :class:`QuantizedLinear`."""

    def __call__(self, x: mx.array) -> mx.array:
        """``[..., input_dims] -> [..., output_dims]``."""
        return ops.linear(x, self["weight"], self.get("bias"))

    def to_quantized(self, group_size: Optional[int] = None, bits: Optional[int] = None,
                     mode: str = "affine", quantize_input: bool = False):
        """Our :class:`QuantizedLinear` with this layer's weight quantized
        (``quantize_input`` is MLX's activation quantization: its own
        ``QQLinear``)."""
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` computed by
    :func:`mlx_moe_kernels.ops.quantized_linear` (affine and mxfp4; other
    modes by ``mx.quantized_matmul``). Frozen, as MLX's."""

    def __call__(self, x: mx.array) -> mx.array:
        """``[..., input_dims] -> [..., output_dims]``."""
        out = _quantized_product(self, x)
        return out if "bias" not in self else out + self["bias"]

    @classmethod
    def from_linear(cls, linear_layer: nn.Module, group_size: Optional[int] = None,
                    bits: Optional[int] = None, mode: str = "affine") -> "QuantizedLinear":
        """The quantized form of a ``Linear`` (its bias kept in float)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        _quantize_into(layer, linear_layer.weight, group_size, bits, mode)
        if "bias" in linear_layer:
            layer.bias = linear_layer.bias
        layer.freeze()
        return layer


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose ``as_linear`` (a tied lm_head) runs on
    :func:`mlx_moe_kernels.ops.linear`; ``to_quantized`` gives our
    :class:`QuantizedEmbedding`."""

    def as_linear(self, x: mx.array) -> mx.array:
        """``x @ weight.T``: logits from hidden states with tied weights."""
        return ops.linear(x, self["weight"])

    def to_quantized(self, group_size: Optional[int] = None, bits: Optional[int] = None,
                     mode: str = "affine", quantize_input: bool = False):
        """Our :class:`QuantizedEmbedding` of this table."""
        if quantize_input:
            raise ValueError("Quantized input is not supported.")
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding``: the lookup dequantizes only the rows it
    gathers (as MLX's, already cheap); ``as_linear`` (a tied quantized
    lm_head) runs on :func:`mlx_moe_kernels.ops.quantized_linear`."""

    def as_linear(self, x: mx.array) -> mx.array:
        """``x @ W.T`` with the quantized table: logits with tied weights."""
        return _quantized_product(self, x)

    @classmethod
    def from_embedding(cls, embedding_layer: nn.Module, group_size: Optional[int] = None,
                       bits: Optional[int] = None, mode: str = "affine") -> "QuantizedEmbedding":
        """The quantized form of an ``Embedding``."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        _quantize_into(layer, embedding_layer.weight, group_size, bits, mode)
        layer.num_embeddings, layer.dims = embedding_layer.weight.shape
        layer.freeze()
        return layer
