"""The benchmark modes on quantized experts (``--bits``/``--group-size``/
``--quant-mode``).

Each mode draws the same float weights as its float counterpart
(:mod:`mlx_moe_kernels.bench.modes`), quantizes them with ``mx.quantize``
into mlx-lm's layout (:class:`~mlx_moe_kernels.bench.shapes.Quantization`)
and times our ``gather_qmm`` / quantized ``switch_glu`` against
``mx.gather_qmm`` (mlx-lm's SwitchGLU on it) and the reference with the same
format; bytes per call count the packed codes, scales and biases. On a CPU,
MLX's ``gather_qmm`` is very slow: stock runs only up to
:data:`QUANTIZED_CPU_STOCK_MAX_ROWS` rows and, like the reference (which
dequantizes every expert per call), makes a single timed call.
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx
import numpy as np

import mlx_moe_kernels
from mlx_moe_kernels import reference
from mlx_moe_kernels.bench.baselines import (
    grouped_reference_gather_qmm,
    grouped_reference_switch_glu,
    stock_switch_glu,
)
from mlx_moe_kernels.bench.shapes import Quantization
from mlx_moe_kernels.bench.workloads import (
    CellResources,
    CellSpec,
    Workload,
    cache_cold_routings,
    dequantized_reference_skip_reason,
    random_expert_weights,
    switch_glu_call_inputs,
    weight_copies_for_cold_cache,
)

QUANTIZED_CPU_STOCK_HALF_TOLERANCE = 0.25
"""The tolerance of stock on quantized experts with float16 or bfloat16
activations on a CPU: MLX 0.32.4's CPU ``gather_qmm`` computes in the half
type (seen: 8.8e-2 for bfloat16 on Qwen3-30B-A3B's layer, growing with K,
against 1e-2 for ours), so the dtype's tolerance would fail it on MLX's own
rounding. A wrong format, scale or index still shows as an error near 1."""

QUANTIZED_CPU_STOCK_MAX_ROWS = 64
"""On a CPU, the stock path of quantized experts (MLX's ``gather_qmm``) runs
only on cells of at most this many rows (T * k), and there makes a single
timed call: MLX 0.32.4's CPU ``gather_qmm`` takes ~0.1 s (float32) to
~0.7 s (bfloat16) for one Qwen3-30B-A3B up projection of 64 rows on 2
cores, growing with the rows (seconds per layer call at T = 64). Larger
cells show ``skip`` in the stock column."""


def quantized_expert_bytes(rows: int, cols: int, dtype: mx.Dtype, quantization: Quantization) -> int:
    """Bytes of one ``[rows, cols]`` expert as :meth:`Quantization.quantize`
    stores it: the packed codes, the scales and (``"affine"``) the biases."""
    groups = rows * (cols // quantization.group_size)
    codes = rows * cols * quantization.bits // 8
    if quantization.mode == "affine":
        return codes + 2 * groups * dtype.size
    return codes + groups  # uint8 scales, no biases


def random_quantized_experts(
    num_experts: int, rows: int, cols: int, dtype: mx.Dtype, quantization: Quantization,
    copies: int, seed: int,
) -> List[tuple]:
    """``copies`` quantized ``[num_experts, rows, cols]`` expert tensors:
    the weights of :func:`random_expert_weights` (same seeds), each
    quantized and evaluated before the next is drawn."""
    out = []
    for copy in range(copies):
        weight = random_expert_weights(num_experts, rows, cols, dtype, copy + 1, seed)[copy]
        quantized = quantization.quantize(weight, dtype)
        mx.eval(quantized)
        del weight
        out.append(quantized)
    return out


def _triple_bytes(weight: tuple) -> int:
    return sum(part.nbytes for part in weight if part is not None)


def _quantized_cpu_limits(resources: CellResources, rows: int) -> tuple:
    """``(stock_skip_reason, single_call)`` of a quantized cell: on a CPU,
    stock runs only up to :data:`QUANTIZED_CPU_STOCK_MAX_ROWS` rows, and
    stock and the reference make a single timed call."""
    if resources.device_type != "cpu":
        return None, {}
    single_call = {
        "reference": "quantized: it dequantizes every expert in float32 on each call; "
        "one timed call, no warm-up",
    }
    if rows > QUANTIZED_CPU_STOCK_MAX_ROWS:
        return (
            f"MLX's CPU gather_qmm takes seconds per call; for quantized experts "
            f"stock runs only up to {QUANTIZED_CPU_STOCK_MAX_ROWS} rows (T*k)",
            single_call,
        )
    single_call["stock"] = (
        "quantized: MLX's CPU gather_qmm is slow; one timed call, no warm-up "
        "besides the agreement check"
    )
    return None, single_call


def _quantized_stock_tolerance(spec: CellSpec, resources: CellResources) -> Optional[float]:
    if resources.device_type == "cpu" and spec.dtype_name in ("float16", "bfloat16"):
        return QUANTIZED_CPU_STOCK_HALF_TOLERANCE
    return None


def quantized_gather_mm_workload(spec: CellSpec, resources: CellResources) -> Workload:
    """Mode ``gather_mm`` on quantized experts: one up projection, as
    mlx-lm's QuantizedSwitchLinear calls ``mx.gather_qmm``.

    ``x`` is ``[T*k, 1, D]`` and the ``[E, H, D]`` weight an ``mx.quantize``
    triple (:class:`Quantization`); ours is :func:`mlx_moe_kernels.gather_qmm`,
    stock ``mx.gather_qmm`` (on a CPU limited by
    :data:`QUANTIZED_CPU_STOCK_MAX_ROWS`), the reference
    ``reference.gather_qmm``. Bytes per call count the packed codes, scales
    and biases of the distinct experts read.
    """
    D, H, E, k = spec.model.dims
    dtype = spec.dtype
    quantization = spec.quantization
    rows = spec.tokens * k
    copies = weight_copies_for_cold_cache(E * quantized_expert_bytes(H, D, dtype, quantization))
    weights = resources.weights.get(
        "up",
        lambda: random_quantized_experts(E, H, D, dtype, quantization, copies, resources.seed),
    )
    routings = cache_cold_routings(resources.rng, spec.tokens, E, k)
    indices = [mx.array(routing) for routing in routings]
    x = mx.random.normal((rows, 1, D), dtype=dtype, key=mx.random.key(resources.seed + 1))
    mx.eval(indices, x)
    formats = quantization.kwargs()

    def call_with(op):
        def call(call_index: int) -> mx.array:
            weight = weights[(call_index // len(indices)) % len(weights)]
            return op(
                x, *weight, rhs_indices=indices[call_index % len(indices)], transpose=True,
                sorted_indices=True, **formats,
            )

        return call

    stock_skip_reason, single_call = _quantized_cpu_limits(resources, rows)
    reference_skip_reason = dequantized_reference_skip_reason(
        (rows + E) * D * H * mx.float32.size
    )
    distinct = float(np.mean([len(np.unique(routing)) for routing in routings]))
    return Workload(
        rows=rows,
        ours=call_with(mlx_moe_kernels.gather_qmm),
        stock=None if stock_skip_reason else call_with(mx.gather_qmm),
        reference=None if reference_skip_reason else call_with(reference.gather_qmm),
        expected=lambda: grouped_reference_gather_qmm(x, weights[0], routings[0], quantization),
        weight_bytes_per_call=distinct * _triple_bytes(weights[0]) / E,
        flops_per_call=2.0 * rows * D * H,
        reference_skip_reason=reference_skip_reason,
        stock_skip_reason=stock_skip_reason,
        single_call=single_call,
        stock_tolerance=_quantized_stock_tolerance(spec, resources),
    )


def quantized_switch_glu_workload(spec: CellSpec, resources: CellResources) -> Workload:
    """Mode ``switch_glu`` on quantized experts: the whole MoE layer with
    gate, up and down as ``mx.quantize`` triples (:class:`Quantization`).

    Ours is the quantized :func:`mlx_moe_kernels.switch_glu`, stock
    :func:`stock_switch_glu` on ``mx.gather_qmm`` (on a CPU limited by
    :data:`QUANTIZED_CPU_STOCK_MAX_ROWS`), the reference
    ``reference.switch_glu``; all with the format's ``group_size``, ``bits``
    and ``mode``. Bytes per call count the packed codes, scales and biases
    of the distinct experts' three projections.
    """
    D, H, E, k = spec.model.dims
    dtype = spec.dtype
    quantization = spec.quantization
    tokens = spec.tokens

    def build():
        return [
            random_quantized_experts(E, rows, cols, dtype, quantization, 1, resources.seed + offset)[0]
            for offset, (rows, cols) in enumerate(((H, D), (H, D), (D, H)))
        ]

    gate, up, down = resources.weights.get("gate_up_down", build)
    routings, indices, x, scores = switch_glu_call_inputs(resources, tokens, E, k, D, dtype)
    formats = quantization.kwargs()

    def call_with(op):
        def call(call_index: int) -> mx.array:
            return op(x, gate, up, down, indices[call_index % len(indices)], scores, **formats)

        return call

    stock_skip_reason, single_call = _quantized_cpu_limits(resources, tokens * k)
    reference_skip_reason = dequantized_reference_skip_reason(
        3 * (tokens * k + E) * D * H * mx.float32.size
    )
    distinct = float(np.mean([len(np.unique(routing)) for routing in routings]))
    expert_bytes = sum(_triple_bytes(weight) for weight in (gate, up, down)) / E
    return Workload(
        rows=tokens * k,
        ours=call_with(mlx_moe_kernels.switch_glu),
        stock=None if stock_skip_reason else call_with(stock_switch_glu),
        reference=None if reference_skip_reason else call_with(reference.switch_glu),
        expected=lambda: grouped_reference_switch_glu(
            x, gate, up, down, routings[0], scores, quantization
        ),
        weight_bytes_per_call=distinct * expert_bytes,
        flops_per_call=6.0 * tokens * k * D * H,
        reference_skip_reason=reference_skip_reason,
        stock_skip_reason=stock_skip_reason,
        single_call=single_call,
        stock_tolerance=_quantized_stock_tolerance(spec, resources),
    )

