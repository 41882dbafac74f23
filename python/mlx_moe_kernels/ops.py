"""Documented Python wrappers of the C++ ops (``mlx_moe_kernels._ext``)."""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx

from mlx_moe_kernels import _ext

StreamOrDevice = Union[None, mx.Stream, mx.Device]


def gather_mm(
    a: mx.array,
    b: mx.array,
    lhs_indices: Optional[mx.array] = None,
    rhs_indices: Optional[mx.array] = None,
    *,
    sorted_indices: bool = False,
    stream: StreamOrDevice = None,
) -> mx.array:
    """Matrix products of gathered matrices, as ``mx.gather_mm``.

    ``out[i] = a[lhs_indices[i]] @ b[rhs_indices[i]]`` for every position
    ``i`` of the broadcast index arrays, where the indices address the
    flattened batch dimensions of ``a`` (``[..., M, K]``) and ``b``
    (``[..., K, N]``). A missing index array defaults to ``arange`` over its
    operand's batch; with neither, this is ``a @ b``. The result has shape
    ``broadcast(lhs_indices, rhs_indices).shape + (M, N)`` (1-d operands are
    expanded and squeezed as in ``mx.matmul``).

    In a Mixture-of-Experts layer ``b`` holds the stacked expert weights and
    ``rhs_indices`` the expert of each token slot; our CPU kernel groups the
    rows by expert with a counting sort so each selected expert's weights
    are read from memory once per call.

    Args:
        a: Left operand, float32, float16 or bfloat16.
        b: Right operand; any strides (the transposed view of a
            ``[E, N, K]`` weight is the fast path for few rows).
        lhs_indices: Integer indices into ``a``'s batch, or ``None``.
        rhs_indices: Integer indices into ``b``'s batch, or ``None``.
        sorted_indices: A hint that the indices are already grouped, as in
            ``mx.gather_mm``; results are the same either way.
        stream: Stream or device; on devices where this build has no
            kernel (GPUs, for now) the call is ``mx.gather_mm``.

    Returns:
        The products, in the promoted dtype of ``a`` and ``b``, computed
        with float32 accumulation.

    Raises:
        ValueError: For mismatched shapes, non-floating or float64 inputs,
            or non-integer indices.
        IndexError: For an index outside ``[0, number of matrices)``
            when the indices are already computed at the call.
        RuntimeError: For such an index in lazily computed indices, when
            the result is evaluated (never an out-of-bounds read).
    """
    return _ext.gather_mm(
        a, b, lhs_indices, rhs_indices, sorted_indices=sorted_indices, stream=stream
    )
