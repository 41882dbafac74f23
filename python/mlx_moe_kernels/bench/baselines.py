"""The computations ours is compared with: MLX's stock path and cheap
per-expert forms of the plain-MLX reference.

* :func:`stock_switch_glu`: the MoE layer as mlx-lm computes it (its
  SwitchGLU on ``mx.gather_mm`` / ``mx.gather_qmm``, then the score-weighted
  sum); also used by ``benchmarks/vs_ggml.py``.
* ``grouped_reference_*``: :mod:`mlx_moe_kernels.reference`'s formulas with
  the rows of each distinct expert stacked and multiplied once, so the
  agreement check's expected result stays cheap and memory-bounded at any
  token count (the reference itself gathers one weight copy per row).
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_moe_kernels import reference
from mlx_moe_kernels.bench.shapes import Quantization

def _grouped_by_expert(
    x: mx.array,
    sorted_rhs_indices: np.ndarray,
    multiply: Callable[[mx.array, np.ndarray], mx.array],
) -> mx.array:
    """Per-expert products of the rows of ``x`` ``[rows, 1, K]``.

    The rows of each distinct expert of ``sorted_rhs_indices`` are stacked
    into one ``[rows_e, K]`` matrix (padded to the largest group) and
    ``multiply(stacked, experts)`` multiplies each stacked matrix (``stacked``
    is ``[G, widest, K]``) by its expert (``experts``, the ``G`` distinct
    experts, sorted). Returns the rows' products ``[rows, 1, N]``.
    """
    rows, _, inner = x.shape
    experts, starts, counts = np.unique(
        sorted_rhs_indices, return_index=True, return_counts=True
    )
    widest = int(counts.max())
    slots = np.arange(widest)
    # Pad a group by repeating its last row (padding rows are dropped below).
    source_rows = np.minimum(starts[:, None] + slots, (starts + counts - 1)[:, None])
    stacked = mx.take(
        x.reshape(rows, inner), mx.array(source_rows.reshape(-1).astype(np.uint32)), axis=0
    ).reshape(len(experts), widest, inner)
    products = multiply(stacked, experts)
    group_of_row = np.repeat(np.arange(len(experts)), counts)
    product_row = group_of_row * widest + (np.arange(rows) - starts[group_of_row])
    cols = products.shape[-1]
    return mx.take(
        products.reshape(-1, cols), mx.array(product_row.astype(np.uint32)), axis=0
    ).reshape(rows, 1, cols)


def grouped_reference_gather_mm(
    x: mx.array, b: mx.array, sorted_rhs_indices: np.ndarray
) -> mx.array:
    """The reference ``gather_mm(x, b, rhs_indices=...)``, one matrix per expert.

    ``x`` is ``[rows, 1, K]`` and ``sorted_rhs_indices`` the sorted expert of
    each row. Rather than gathering one copy of ``b``'s matrix per row, the
    rows of each distinct expert are stacked into one ``[rows_e, K]`` matrix
    (padded to the largest group) and :func:`reference.gather_mm` multiplies
    each once by its expert: the same float32 products, with memory bounded
    by the distinct experts. Returns ``[rows, 1, N]``.
    """
    return _grouped_by_expert(
        x,
        sorted_rhs_indices,
        lambda stacked, experts: reference.gather_mm(
            stacked, b, rhs_indices=mx.array(experts.astype(np.uint32))
        ),
    )


DEQUANTIZED_CHUNK_BYTES = 512 * 2**20
"""Float32 bytes of dequantized experts that
:func:`grouped_reference_gather_qmm` holds at a time."""


def quantized_output_dtype(x_dtype: mx.Dtype, weight: tuple, mode: str) -> mx.Dtype:
    """The dtype ``gather_qmm`` returns (as :func:`reference.gather_qmm`):
    ``x`` promoted with the scales and biases for ``"affine"``, ``x``'s
    dtype otherwise."""
    if mode != "affine":
        return x_dtype
    promoted = mx.zeros((), x_dtype)
    for part in weight[1:]:
        if part is not None:
            promoted = promoted + mx.zeros((), part.dtype)
    return promoted.dtype


def grouped_reference_gather_qmm(
    x: mx.array,
    weight: tuple,
    sorted_rhs_indices: np.ndarray,
    quantization: Quantization,
) -> mx.array:
    """The reference ``gather_qmm(x, *weight, rhs_indices=..., transpose=True)``,
    one matrix per expert.

    ``weight`` is an ``mx.quantize`` triple ``(w, scales, biases)`` of
    ``[E, N, K]`` experts (``biases`` ``None`` for ``"mxfp4"``). As
    :func:`reference.gather_qmm`: the experts dequantized in float32
    (:func:`reference.dequantize`), float32 products of the float32 rows,
    cast to :func:`quantized_output_dtype`; but only the distinct experts
    are dequantized, a chunk of them at a time (evaluated, so memory stays
    bounded by :data:`DEQUANTIZED_CHUNK_BYTES`), and each is multiplied once
    by its stacked rows (as :func:`grouped_reference_gather_mm`).
    Returns ``[rows, 1, N]``.
    """
    w, scales, biases = weight
    out_dtype = quantized_output_dtype(x.dtype, weight, quantization.mode)
    cols, inner = w.shape[1], x.shape[-1]
    chunk = max(1, DEQUANTIZED_CHUNK_BYTES // (cols * inner * mx.float32.size))

    def multiply(stacked: mx.array, experts: np.ndarray) -> mx.array:
        parts = []
        for start in range(0, len(experts), chunk):
            ids = mx.array(experts[start : start + chunk].astype(np.uint32))
            full = reference.dequantize(
                w[ids], scales[ids], None if biases is None else biases[ids],
                group_size=quantization.group_size, bits=quantization.bits,
                mode=quantization.mode, dtype=mx.float32,
            )
            product = reference.gather_mm(
                stacked[start : start + chunk].astype(mx.float32), full.swapaxes(-1, -2)
            )
            mx.eval(product)
            parts.append(product)
            del full
        return mx.concatenate(parts, axis=0).astype(out_dtype)

    return _grouped_by_expert(x, sorted_rhs_indices, multiply)


def stock_switch_glu(x, gate, up, down, indices, scores, *, group_size=None, bits=None, mode="affine"):
    """The stock MoE layer: mlx-lm's SwitchGLU on ``mx.gather_mm`` (sorting
    the rows by expert when there are at least 64, as mlx-lm does), then the
    score-weighted sum over the k experts as mlx-lm's MoE blocks compute it.
    ``x`` [T, D], ``indices`` and ``scores`` [T, k]; returns [T, D].
    Quantized weights (``(weight, scales, biases)`` triples, the format in
    ``group_size``/``bits``/``mode``) go through ``mx.gather_qmm``, as
    mlx-lm's ``QuantizedSwitchLinear`` does."""
    x = mx.expand_dims(x, (-2, -3))
    sort_rows = indices.size >= 64
    idx, inverse = indices, None
    if sort_rows:
        flat = indices.flatten()
        order = mx.argsort(flat)
        inverse = mx.argsort(order)
        x = x.flatten(0, -3)[order // indices.shape[-1]]
        idx = flat[order]

    def project(rows, weight):
        if isinstance(weight, (tuple, list)):
            w, s, b = weight
            return mx.gather_qmm(
                rows, w, s, b, rhs_indices=idx, transpose=True, group_size=group_size,
                bits=bits, mode=mode, sorted_indices=sort_rows,
            )
        return mx.gather_mm(rows, weight.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sort_rows)

    g = project(x, gate)
    u = project(x, up)
    y = project(nn.silu(g) * u, down)
    if sort_rows:
        y = mx.unflatten(y[inverse], 0, indices.shape)
    return (y.squeeze(-2) * scores[..., None]).sum(-2)


def grouped_reference_switch_glu(
    x, gate, up, down, indices: np.ndarray, scores, quantization: Optional[Quantization] = None
):
    """The reference MoE layer (:func:`reference.switch_glu`'s formula) with
    each projection done per expert by :func:`grouped_reference_gather_mm`
    (quantized experts, ``(w, scales, biases)`` triples in the format of
    ``quantization``: :func:`grouped_reference_gather_qmm`), so memory stays
    bounded for any token count. Returns [T, D]."""
    tokens, top_k = indices.shape
    flat = indices.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_experts = flat[order]
    rows = mx.take(x, mx.array((order // top_k).astype(np.uint32)), axis=0)[:, None, :]

    def project(a, weight):
        if quantization is not None:
            return grouped_reference_gather_qmm(a, weight, sorted_experts, quantization)
        return grouped_reference_gather_mm(a, weight.swapaxes(-1, -2), sorted_experts)

    g = project(rows, gate)
    u = project(rows, up)
    y = project(nn.silu(g) * u, down)
    inverse = mx.array(np.argsort(order).astype(np.uint32))
    y = mx.take(y[:, 0, :], inverse, axis=0).reshape(tokens, top_k, -1)
    return (y * scores[..., None]).sum(-2)

