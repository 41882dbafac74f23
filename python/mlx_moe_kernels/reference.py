"""The ops of ``mlx_moe_kernels`` written in plain MLX operations.

These are the oracle of the tests: slow, obvious, and independent of our
kernels. They run on any device and dtype MLX supports.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


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
