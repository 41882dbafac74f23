"""The ops of ``mlx_moe_kernels`` written in plain MLX operations.

These are the oracle of the tests: slow, obvious, and independent of our
kernels. They run on any device and dtype MLX supports.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn


def _default_indices(x: mx.array) -> mx.array:
    batch = x.shape[:-2]
    count = 1
    for d in batch:
        count *= d
    return mx.arange(count, dtype=mx.uint32).reshape(batch)


def gather_mm(
    a: mx.array,
    b: mx.array,
    lhs_indices: Optional[mx.array] = None,
    rhs_indices: Optional[mx.array] = None,
    *,
    sorted_indices: bool = False,
    stream=None,
) -> mx.array:
    """Reference ``gather_mm``: gather the matrices with ``take``, then a
    batched ``matmul`` in float32, cast to the promoted input dtype.

    Same arguments and result as :func:`mlx_moe_kernels.gather_mm`
    (``sorted_indices`` is accepted and ignored).
    """
    del sorted_indices
    if lhs_indices is None and rhs_indices is None:
        return mx.matmul(a, b, stream=stream)
    squeeze_rows = a.ndim == 1
    squeeze_cols = b.ndim == 1
    if squeeze_rows:
        a = a[None, :]
    if squeeze_cols:
        b = b[:, None]
    out_dtype = (mx.zeros((), a.dtype) + mx.zeros((), b.dtype)).dtype  # MLX promotion
    lhs = _default_indices(a) if lhs_indices is None else lhs_indices
    rhs = _default_indices(b) if rhs_indices is None else rhs_indices
    lhs, rhs = mx.broadcast_arrays(lhs, rhs)
    a_flat = a.reshape(-1, *a.shape[-2:]).astype(mx.float32)
    b_flat = b.reshape(-1, *b.shape[-2:]).astype(mx.float32)
    a_rows = mx.take(a_flat, lhs.flatten(), axis=0, stream=stream)
    b_mats = mx.take(b_flat, rhs.flatten(), axis=0, stream=stream)
    out = mx.matmul(a_rows, b_mats, stream=stream).astype(out_dtype)
    out = out.reshape(*lhs.shape, a.shape[-2], b.shape[-1])
    if squeeze_rows:
        out = out.squeeze(-2)
    if squeeze_cols:
        out = out.squeeze(-1)
    return out


def switch_glu(
    x: mx.array,
    gate_weight: Optional[mx.array],
    up_weight: mx.array,
    down_weight: mx.array,
    indices: mx.array,
    scores: Optional[mx.array] = None,
    *,
    group_size: int = 64,
    bits: int = 4,
    mode: str = "affine",
    stream=None,
) -> mx.array:
    """Reference ``switch_glu``: mlx-lm's ``SwitchGLU`` (SwiGLU) followed,
    with ``scores``, by the weighted sum of mlx-lm's Qwen MoE blocks.

    Each projection is a :func:`gather_mm` of the token rows with the
    selected experts' (transposed) weights, rounded to the compute dtype;
    then ``silu(gate) * up`` in the compute dtype, the down projection, and
    ``(y * scores[..., None]).sum(-2)``. Every intermediate is rounded to
    the compute dtype, as in mlx-lm (the fused op rounds only the hidden
    activations). Same arguments and result as
    :func:`mlx_moe_kernels.switch_glu` (argument checking aside).

    Quantized weights (each projection a ``(weight, scales, biases)``
    tuple): every projection is :func:`gather_qmm` instead, intermediates
    rounded as above.
    """
    if isinstance(down_weight, (tuple, list)):
        return _quantized_switch_glu(
            x, gate_weight, up_weight, down_weight, indices, scores,
            group_size=group_size, bits=bits, mode=mode, stream=stream,
        )
    if gate_weight is None:  # fused gate_up [E, 2H, D], gate rows first
        hidden_dims = up_weight.shape[1] // 2
        gate_weight = up_weight[:, :hidden_dims, :]
        up_weight = up_weight[:, hidden_dims:, :]
    rows = mx.expand_dims(x, (-2, -3))  # [..., 1, 1, D]: one row per token

    def project(a: mx.array, weight: mx.array) -> mx.array:
        return gather_mm(a, weight.swapaxes(-1, -2), rhs_indices=indices, stream=stream)

    gate = project(rows, gate_weight)  # [..., k, 1, H]
    up = project(rows, up_weight)
    hidden = nn.silu(gate) * up
    out = project(hidden, down_weight).squeeze(-2)  # [..., k, D]
    if scores is None:
        return out
    return (out * scores[..., None]).sum(axis=-2)


def route(indices: mx.array, num_experts: int, *, stream=None):
    """Reference ``route``: the slots of ``indices`` sorted by expert with a
    stable argsort, and each expert's range from a histogram's cumulative
    sum. Same result as :func:`mlx_moe_kernels.route`."""
    flat = indices.flatten().astype(mx.int64)
    # A stable sort of the experts: break ties by slot number.
    keys = flat * flat.size + mx.arange(flat.size, dtype=mx.int64)
    order = mx.argsort(keys, stream=stream).astype(mx.uint32)
    counts = (flat[:, None] == mx.arange(num_experts, dtype=mx.int64)[None, :]).sum(axis=0)
    offsets = mx.concatenate([mx.zeros((1,), mx.int64), mx.cumsum(counts.astype(mx.int64))])
    return order, offsets.astype(mx.uint32)


def softmax_top_k(logits: mx.array, k: int, normalize: bool = False, *, stream=None):
    """Reference ``softmax_top_k``, mlx-lm's composition: float32 softmax
    (rounded to the logits' dtype), the ``k`` largest by ``mx.argpartition``
    (in its order), their probabilities, renormalized over the ``k`` when
    ``normalize``. Returns ``(indices uint32, scores)``."""
    probs = mx.softmax(logits, axis=-1, precise=True, stream=stream)
    indices = mx.stop_gradient(mx.argpartition(probs, kth=-k, axis=-1, stream=stream)[..., -k:])
    scores = mx.take_along_axis(probs, indices, axis=-1, stream=stream)
    if normalize:
        scores = scores / scores.sum(axis=-1, keepdims=True, stream=stream)
    return indices.astype(mx.uint32), scores


def dequantize(
    weight: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    *,
    group_size: int = 64,
    bits: int = 4,
    mode: str = "affine",
    dtype: Optional[mx.Dtype] = None,
    stream=None,
) -> mx.array:
    """``mx.dequantize`` in float32, cast to ``dtype`` (default: the dtype
    a quantized matmul with these scales computes in: the scales' dtype for
    ``"affine"``, float32 otherwise)."""
    full = mx.dequantize(
        weight, scales, biases, group_size=group_size, bits=bits, mode=mode,
        dtype=mx.float32, stream=stream,
    )
    if dtype is None:
        dtype = scales.dtype if mode == "affine" else mx.float32
    return full.astype(dtype)


def gather_qmm(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    lhs_indices: Optional[mx.array] = None,
    rhs_indices: Optional[mx.array] = None,
    transpose: bool = True,
    group_size: int = 64,
    bits: int = 4,
    mode: str = "affine",
    *,
    sorted_indices: bool = False,
    stream=None,
) -> mx.array:
    """Reference ``gather_qmm``: dequantize every matrix of ``w`` in
    float32, then :func:`gather_mm` in float32, cast to the dtype
    ``mx.gather_qmm`` returns (``x`` promoted with the scales and biases for
    ``"affine"``, ``x``'s dtype otherwise). Same arguments and result as
    :func:`mlx_moe_kernels.gather_qmm`."""
    del sorted_indices
    if mode == "affine":
        out_dtype = (mx.zeros((), x.dtype) + mx.zeros((), scales.dtype)).dtype
        if biases is not None:
            out_dtype = (mx.zeros((), out_dtype) + mx.zeros((), biases.dtype)).dtype
    else:
        out_dtype = x.dtype
    full = dequantize(
        w, scales, biases, group_size=group_size, bits=bits, mode=mode,
        dtype=mx.float32, stream=stream,
    )
    if transpose:
        full = full.swapaxes(-1, -2)
    out = gather_mm(
        x.astype(mx.float32), full, lhs_indices, rhs_indices, stream=stream
    )
    return out.astype(out_dtype)


def linear(x: mx.array, weight: mx.array, bias: Optional[mx.array] = None, *, stream=None) -> mx.array:
    """Reference ``linear``: ``x @ weight.T (+ bias)`` with MLX's matmul."""
    out = mx.matmul(x, weight.T, stream=stream)
    return out if bias is None else out + bias


def quantized_linear(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    group_size: int = 64,
    bits: int = 4,
    mode: str = "affine",
    *,
    bias: Optional[mx.array] = None,
    stream=None,
) -> mx.array:
    """Reference ``quantized_linear``: :func:`gather_qmm` (float32
    dequantize, float32 matmul) over the single matrix ``w``."""
    out = gather_qmm(
        x.reshape(1, -1, x.shape[-1]), w[None], scales[None],
        None if biases is None else biases[None],
        group_size=group_size, bits=bits, mode=mode, stream=stream,
    )
    out = out.reshape(*x.shape[:-1], w.shape[0])
    return out if bias is None else out + bias


def scaled_dot_product_attention(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask: Optional[str] = None, stream=None
) -> mx.array:
    """Reference attention in float32 MLX ops: key/value heads repeated for
    their query heads, ``softmax(scale * q @ k.T)`` (``"causal"``: query
    ``i`` sees keys ``j <= S - L + i``) times ``v``, cast to ``q``'s dtype."""
    groups = q.shape[1] // k.shape[1]
    keys = mx.repeat(k, groups, axis=1).astype(mx.float32)
    values = mx.repeat(v, groups, axis=1).astype(mx.float32)
    scores = (q.astype(mx.float32) @ keys.swapaxes(-1, -2)) * scale
    if mask == "causal":
        L, S = q.shape[2], k.shape[2]
        visible = (mx.arange(L)[:, None] + (S - L)) >= mx.arange(S)[None, :]
        scores = mx.where(visible, scores, -float("inf"))
    weights = mx.softmax(scores, axis=-1)
    return (weights @ values).astype(q.dtype)


def _quantized_switch_glu(x, gate, up, down, indices, scores, *, group_size, bits, mode, stream):
    """``switch_glu`` on quantized ``(weight, scales, biases)`` projections."""
    rows = mx.expand_dims(x, (-2, -3))

    def project(a, quantized):
        weight, scales, biases = quantized
        return gather_qmm(
            a, weight, scales, biases, rhs_indices=indices, transpose=True,
            group_size=group_size, bits=bits, mode=mode, stream=stream,
        )

    g = project(rows, gate)
    u = project(rows, up)
    hidden = nn.silu(g) * u
    out = project(hidden, down).squeeze(-2)
    if scores is None:
        return out
    return (out * scores[..., None]).sum(axis=-2)
