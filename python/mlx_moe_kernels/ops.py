"""Documented Python wrappers of the C++ ops (``mlx_moe_kernels._ext``)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

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

    An index outside its range in lazily computed indices cannot raise
    during evaluation: the affected output rows are NaN (never an
    out-of-bounds read), on the CPU as on a Metal GPU.
    """
    return _ext.gather_mm(
        a, b, lhs_indices, rhs_indices, sorted_indices=sorted_indices, stream=stream
    )


def gather_qmm(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    lhs_indices: Optional[mx.array] = None,
    rhs_indices: Optional[mx.array] = None,
    transpose: bool = True,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    *,
    sorted_indices: bool = False,
    stream: StreamOrDevice = None,
) -> mx.array:
    """Matrix products with gathered quantized matrices, as ``mx.gather_qmm``.

    ``out[i] = x[lhs_indices[i]] @ W[rhs_indices[i]].T`` (``transpose``,
    ``W`` ``[..., N, K]``) or ``x[lhs_indices[i]] @ W[rhs_indices[i]]``
    (``W`` ``[..., K, N]``), where ``W`` is what ``mx.quantize`` packed into
    ``w``, ``scales`` and ``biases``, and the indices address the flattened
    batch dimensions of ``x`` (``[..., M, K]``) and ``w``; missing index
    arrays default to ``arange`` over their operand's batch. The result has
    shape ``broadcast(lhs_indices, rhs_indices).shape + (M, N)``.

    Our CPU kernel groups the rows by matrix (counting sort), dequantizes
    each selected matrix a block of rows at a time into cache (never a
    whole dequantized copy) and multiplies the block with all of its rows
    in float32.

    Args:
        x: Activations, float32, float16 or bfloat16.
        w: Packed codes, uint32 ``[..., N, K * bits / 32]`` (``transpose``)
            or ``[..., K, N * bits / 32]``.
        scales: Per-group scales ``[..., rows, groups]``: floating point for
            ``"affine"``, uint8 (E8M0) for ``"mxfp4"``.
        biases: Per-group biases (``"affine"`` only), like ``scales``.
        lhs_indices: Integer indices into ``x``'s batch, or ``None``.
        rhs_indices: Integer indices into ``w``'s batch, or ``None``.
        transpose: Whether ``W`` is ``[N, K]`` (mlx-lm's layout) and the
            product uses its transpose.
        group_size: Elements per scale: 32, 64 or 128 for ``"affine"``
            (default 64), 32 for ``"mxfp4"`` (default).
        bits: Bits per element: 1, 2, 3, 4, 5, 6 or 8 for ``"affine"``
            (default 4), 4 for ``"mxfp4"``.
        mode: ``"affine"`` (``w = scale * q + bias``) or ``"mxfp4"``; other
            modes of ``mx.quantize`` raise ``ValueError``.
        sorted_indices: A hint that the indices are grouped, as in
            ``mx.gather_qmm``; results are the same either way.
        stream: Stream or device; where this build has no kernel (GPUs, for
            now) the call is ``mx.gather_qmm``.

    Returns:
        The products, float32-accumulated, in ``x``'s dtype promoted with
        the scales' and biases' (``"affine"``) or in ``x``'s (``"mxfp4"``).
        Differentiable in ``x`` only.

    Raises:
        ValueError: For an unsupported mode, bits or group size, shapes that
            do not match (``w``, ``scales``, ``biases``, ``x``), wrong
            dtypes, or biases missing in affine mode.
        IndexError: For an index outside its range when the indices are
            already computed at the call.

    An index out of range in lazily computed indices gives NaN output rows
    (never an out-of-bounds read).
    """
    return _ext.gather_qmm(
        x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, mode,
        sorted_indices=sorted_indices, stream=stream,
    )


QuantizedWeight = Tuple[mx.array, mx.array, Optional[mx.array]]
"""An ``mx.quantize`` result as ``switch_glu`` takes it: ``(weight, scales,
biases)``, with ``biases`` ``None`` in ``"mxfp4"`` mode."""


def linear(
    x: mx.array,
    weight: mx.array,
    bias: Optional[mx.array] = None,
    *,
    stream: StreamOrDevice = None,
) -> mx.array:
    """A dense projection ``x @ weight.T (+ bias)``, as ``nn.Linear``.

    On the CPU this is our gather kernel over a single matrix: a few rows
    (decoding) stream ``weight`` once over every core at memory speed; many
    rows (a prompt) run the register-tiled path. On other devices it is
    ``mx.matmul`` (MLX's GPU matmul is already tuned).

    Args:
        x: Activations ``[..., K]``, float32, float16 or bfloat16.
        weight: ``[N, K]``, as ``nn.Linear`` stores it.
        bias: Optional ``[N]``, added to the product.
        stream: Stream or device.

    Returns:
        ``[..., N]`` in the promoted dtype of ``x`` and ``weight`` (then of
        the bias), float32-accumulated. Differentiable in all inputs.

    Raises:
        ValueError: If ``weight`` is not 2-d, the feature sizes differ, or
            the dtypes promote to something other than float32, float16 or
            bfloat16.
    """
    out = _ext.linear(x, weight, stream=stream)
    return out if bias is None else mx.add(out, bias, stream=stream)


def quantized_linear(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    *,
    bias: Optional[mx.array] = None,
    stream: StreamOrDevice = None,
) -> mx.array:
    """``x @ W.T (+ bias)`` for one ``mx.quantize`` triple, as
    ``nn.QuantizedLinear`` (``mx.quantized_matmul`` with ``transpose=True``).

    On the CPU this is our ``gather_qmm`` kernel over a single matrix: a
    few rows multiply the packed codes directly (one pass over ``w`` at
    memory speed), many rows dequantize a block of ``w`` at a time into
    cache. On other devices it is ``mx.quantized_matmul``.

    Args:
        x: Activations ``[..., K]``, float32, float16 or bfloat16.
        w: Packed codes, uint32 ``[N, K * bits / 32]``.
        scales: Per-group scales ``[N, K / group_size]``.
        biases: Per-group biases (``"affine"`` only).
        group_size, bits, mode: The quantization, as in :func:`gather_qmm`
            (``"affine"`` or ``"mxfp4"``).
        bias: Optional ``[N]`` layer bias (``nn.QuantizedLinear.bias``).
        stream: Stream or device.

    Returns:
        ``[..., N]`` in the dtype ``mx.quantized_matmul`` gives. Differentiable
        in ``x``.

    Raises:
        ValueError: For an unsupported format, mismatched shapes or dtypes.
    """
    out = _ext.quantized_linear(x, w, scales, biases, group_size, bits, mode, stream=stream)
    return out if bias is None else mx.add(out, bias, stream=stream)


def scaled_dot_product_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: Union[None, str, mx.array] = None,
    stream: StreamOrDevice = None,
) -> mx.array:
    """Attention as ``mx.fast.scaled_dot_product_attention``:
    ``softmax(scale * q @ k.T + mask) @ v`` per head, with grouped-query
    attention (each key/value head serves ``Hq / Hkv`` query heads).

    On the CPU, with no mask or ``"causal"``, this is our kernel: every
    query head of a key/value head goes through the keys a block at a time
    with an online softmax (flash-attention's scheme), so the keys and
    values (a KV cache) are read once per step and no ``[L, S]`` score
    matrix is written. Array masks, and other devices, use MLX's.

    Args:
        q: Queries ``[B, Hq, L, d]``.
        k: Keys ``[B, Hkv, S, d]`` (any strides with a contiguous last
            axis are read in place, e.g. a slice of a preallocated cache).
        v: Values ``[B, Hkv, S, dv]``.
        scale: Multiplies the scores (usually ``d ** -0.5``).
        mask: ``None``, ``"causal"`` (query ``i`` sees keys up to
            ``S - L + i``, as MLX aligns it) or an additive/boolean array.
        stream: Stream or device.

    Returns:
        ``[B, Hq, L, dv]`` in the inputs' dtype (float32, float16 or
        bfloat16), with float32 scores and accumulation.

    Raises:
        ValueError: For shapes that do not fit together, mixed or
            unsupported dtypes, or an unknown mask string.
    """
    if isinstance(mask, mx.array):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, stream=stream)
    return _ext.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask or "", stream=stream)


def rope(
    x: mx.array,
    dims: int,
    *,
    traditional: bool,
    base: Optional[float],
    scale: float,
    offset: Union[int, mx.array],
    freqs: Optional[mx.array] = None,
    stream: StreamOrDevice = None,
) -> mx.array:
    """Rotary position embedding, as ``mx.fast.rope``: the first ``dims``
    features of ``x``'s last axis rotated in pairs by ``(offset + position)
    * scale * base ** (-2 i / dims)``, the position being the index along
    the second-to-last axis.

    On the CPU, with an integer offset and no custom ``freqs``, this is one
    kernel (MLX's CPU rope is a composition of a dozen small ops, ~0.1-0.3
    ms per call: twice per layer per token). Otherwise ``mx.fast.rope``.

    Returns:
        ``x``'s shape and dtype. Differentiable.

    Raises:
        ValueError: For odd or too large ``dims``, fewer than 2 dimensions,
            or an unsupported dtype.
    """
    if freqs is not None or base is None or isinstance(offset, mx.array):
        return mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale, offset=offset,
                            freqs=freqs, stream=stream)
    return _ext.rope(x, dims, traditional=traditional, base=float(base), scale=float(scale),
                     offset=int(offset), stream=stream)


def softmax_top_k(
    logits: mx.array, k: int, normalize: bool = False, *, stream: StreamOrDevice = None
) -> Tuple[mx.array, mx.array]:
    """A softmax router's expert choice (Qwen2-MoE, Qwen3-MoE): for every
    row of ``logits`` ``[..., E]``, the ``k`` experts of highest probability
    ``softmax(logits)`` (computed in float32) and their probabilities in the
    logits' dtype, renormalized to sum to one over the ``k`` when
    ``normalize`` (a config's ``norm_topk_prob``).

    The same numbers as the composition mlx-lm's MoE blocks run
    (:func:`mlx_moe_kernels.reference.softmax_top_k`: ``mx.softmax(...,
    precise=True)``, ``mx.argpartition``, ``mx.take_along_axis``, a sum and
    a division, each rounded to the logits' dtype), as one CPU kernel: at
    one token those are six graph nodes of a few microseconds each for 128
    numbers, per layer and token. Elsewhere the composition itself.

    Returns:
        ``(indices, scores)``: ``[..., k]`` each; ``indices`` uint32, on the
        CPU most probable first (among equal logits the lower expert first),
        on other devices in ``mx.argpartition``'s order; ``scores`` in the
        logits' dtype, differentiable in ``logits``.

    Raises:
        ValueError: For ``k`` outside ``[1, E]``, a scalar, or logits that
            are not float32, float16 or bfloat16.
    """
    return _ext.softmax_top_k(logits, k, normalize, stream=stream)


def rms_norm(
    x: mx.array, weight: Optional[mx.array], eps: float, *, stream: StreamOrDevice = None
) -> mx.array:
    """RMS normalisation over the last axis, as ``mx.fast.rms_norm``:
    ``x / sqrt(mean(x ** 2) + eps) * weight``, computed in float32.

    On the CPU one pass of our kernel (MLX's CPU ``rms_norm`` costs ~40-100
    us per call at one token, four calls per decoder layer); elsewhere
    ``mx.fast.rms_norm``.

    Returns:
        ``x``'s shape, in ``x``'s dtype promoted with the weight's.
        Differentiable.

    Raises:
        ValueError: For a weight that is not ``[x.shape[-1]]`` or an
            unsupported dtype.
    """
    return _ext.rms_norm(x, weight, eps=eps, stream=stream)


def switch_glu(
    x: mx.array,
    gate_weight: Union[None, mx.array, QuantizedWeight],
    up_weight: Union[mx.array, QuantizedWeight],
    down_weight: Union[mx.array, QuantizedWeight],
    indices: mx.array,
    scores: Optional[mx.array] = None,
    *,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    first_expert: Optional[int] = None,
    stream: StreamOrDevice = None,
) -> mx.array:
    """The expert part of a Mixture-of-Experts layer in one fused op:
    mlx-lm's ``SwitchGLU`` with SwiGLU, optionally with the score-weighted
    combine of the ``k`` selected experts.

    For every token ``t`` (a position of ``x``'s leading dimensions) and slot
    ``j`` with expert ``e = indices[t, j]``::

        h[t, j] = silu(x[t] @ gate_weight[e].T) * (x[t] @ up_weight[e].T)
        y[t, j] = h[t, j] @ down_weight[e].T

    where ``silu(g) = g * sigmoid(g)``. Without ``scores`` the result is
    ``y`` (``[..., k, D]``, what mlx-lm's ``SwitchGLU`` returns); with
    ``scores`` it is ``sum_j scores[t, j] * y[t, j]`` (``[..., D]``), the
    combine of a MoE block, done inside the down projection so the
    ``[..., k, D]`` intermediate is never written.

    The products accumulate in float32; the hidden activations ``h`` are
    rounded to the compute dtype once (mlx-lm rounds the gate, the up
    projection and ``h`` separately), the output once at the end. The
    tokens are grouped by expert on the device (a counting sort), so each
    selected expert's weights are read once per call.

    Args:
        x: Inputs ``[..., D]``.
        gate_weight: Gate projections ``[E, H, D]`` (mlx-lm's
            ``SwitchLinear`` layout), or ``None`` when ``up_weight`` is a
            fused gate-up weight.
        up_weight: Up projections ``[E, H, D]``, or, with
            ``gate_weight=None``, a fused ``[E, 2H, D]`` weight with the gate
            rows first.
        down_weight: Down projections ``[E, D, H]``.
        indices: The experts of each token, ``[..., k]`` (the leading
            dimensions of ``x``), any integer dtype, values in ``[0, E)``;
            an expert may repeat within a token. Not differentiable.
        scores: Optional routing weights, floating point, the shape of
            ``indices``.
        group_size, bits, mode: The quantization format when the weights
            are quantized (as :func:`gather_qmm`); ignored otherwise.
        first_expert: Expert parallelism: the weights hold experts
            ``first_expert .. first_expert + E - 1`` of a larger set, and
            ``indices`` are ids in that set. A slot whose expert is outside
            the range contributes nothing (its row is zero without
            ``scores``); the routing puts those slots in a bucket no kernel
            visits, so nothing is read or computed for them. ``k`` may then
            exceed ``E`` and no id is out of range. Not differentiable in
            this mode (inference sharding).
        stream: Stream or device; on devices where this build has no
            kernel (GPUs, for now) the op is composed from ``mx.gather_mm``
            (``mx.gather_qmm``).

    Quantized experts: pass each of ``gate_weight``, ``up_weight`` and
    ``down_weight`` as an ``mx.quantize`` triple ``(weight, scales,
    biases)`` (mlx-lm's ``QuantizedSwitchLinear`` parameters; all three
    quantized alike, no fused gate-up). The kernels dequantize one block of
    an expert's rows at a time into cache, never a whole expert; gradients
    then flow to ``x`` and ``scores`` only.

    Returns:
        ``[..., k, D]`` without ``scores``, in the promoted dtype of ``x``
        and the weights (float32, float16 or bfloat16); ``[..., D]`` with
        ``scores``, in that dtype promoted with ``scores.dtype``.
        Differentiable in ``x``, the weights and ``scores``.

    Raises:
        ValueError: (message starts with ``[switch_glu]`` and names the
            argument) for mismatched shapes, ``k == 0`` or ``k > E``,
            non-integer indices, non-floating scores, or inputs that promote
            to a dtype other than float32, float16 or bfloat16.
        IndexError: For an index outside ``[0, E)`` when the indices are
            already computed at the call.

    An index out of range in lazily computed indices cannot raise during
    evaluation: the whole output is then NaN (never an out-of-bounds read),
    on the CPU as on a Metal GPU.
    """
    quantized = [isinstance(w, (tuple, list)) for w in (gate_weight, up_weight, down_weight)]
    if any(quantized):
        if not all(quantized):
            raise ValueError(
                "[switch_glu] Quantized experts need gate_weight, up_weight and down_weight "
                "all given as (weight, scales, biases) triples."
            )
        parts = []
        for name, triple in (("gate_weight", gate_weight), ("up_weight", up_weight), ("down_weight", down_weight)):
            if len(triple) != 3:
                raise ValueError(
                    f"[switch_glu] {name} must be a (weight, scales, biases) triple, got {len(triple)} items."
                )
            parts.extend(triple)
        out = _ext.switch_glu_quantized(
            x, *parts, indices, scores, group_size, bits, mode, first_expert=first_expert, stream=stream
        )
    else:
        out = _ext.switch_glu(
            x, gate_weight, up_weight, down_weight, indices, scores, first_expert=first_expert, stream=stream
        )
    return out if first_expert is None else _inference_only(out)


@mx.custom_function
def _inference_only(out: mx.array) -> mx.array:
    """``out`` itself; asking for its gradient raises (the expert-parallel
    routing's extra bucket has no backward pass)."""
    return out


@_inference_only.vjp
def _inference_only_vjp(primals, cotangent, output):
    raise ValueError(
        "[switch_glu] gradients are not defined with first_expert (expert-parallel sharding is for "
        "inference); run the unsharded model to train"
    )


def route(
    indices: mx.array,
    num_experts: int,
    *,
    stream: StreamOrDevice = None,
) -> Tuple[mx.array, mx.array]:
    """Group the token slots of a top-k routing by expert (always evaluated
    on the CPU, whatever ``stream`` says: a small integer sort, and there a
    bad index can raise).

    The slots of ``indices`` (``[..., k]``) are numbered in row-major order,
    ``s = t * k + j``. ``order`` lists them sorted by expert, stably (slots
    of one expert keep their order), and expert ``e``'s slots are
    ``order[offsets[e]:offsets[e + 1]]``::

        order = argsort(indices.flatten(), stable)
        offsets[e] = number of slots with an expert < e

    Computed on the device with a counting sort (histogram, prefix sum,
    scatter): no argsort and no host synchronisation. This is the first step
    of :func:`switch_glu`, exposed for inspection and tests.

    Args:
        indices: Expert indices, any shape, any integer dtype, values in
            ``[0, num_experts)``.
        num_experts: The number of experts ``E`` (positive).
        stream: Stream or device.

    Returns:
        ``(order, offsets)``: uint32 arrays of shapes ``[indices.size]`` and
        ``[num_experts + 1]``.

    Raises:
        ValueError: For non-integer indices or ``num_experts <= 0``.
        IndexError: For an index outside ``[0, num_experts)`` when the
            indices are already computed at the call.

    An index out of range in lazily computed indices makes every offset
    ``0xFFFFFFFF`` (an impossible range) instead of raising during
    evaluation.
    """
    order, offsets = _ext.route(indices, num_experts, stream=stream)
    return order, offsets
