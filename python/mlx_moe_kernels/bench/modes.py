"""The benchmark modes on float experts, and the registry :data:`MODES`.

Each mode function builds the :class:`~mlx_moe_kernels.bench.workloads.Workload`
of one cell (see :mod:`mlx_moe_kernels.bench.workloads` for the contract);
with quantized experts it hands over to its counterpart in
:mod:`mlx_moe_kernels.bench.quantized_workloads`. Adding a mode is adding
one such function to :data:`MODES`.
"""

from __future__ import annotations

from typing import Callable, Dict

import mlx.core as mx
import numpy as np

import mlx_moe_kernels
from mlx_moe_kernels import reference
from mlx_moe_kernels.bench.baselines import (
    grouped_reference_gather_mm,
    grouped_reference_switch_glu,
    stock_switch_glu,
)
from mlx_moe_kernels.bench.quantized_workloads import (
    quantized_gather_mm_workload,
    quantized_switch_glu_workload,
)
from mlx_moe_kernels.bench.workloads import (
    CellResources,
    CellSpec,
    Workload,
    cache_cold_routings,
    gathered_reference_skip_reason,
    random_expert_weights,
    switch_glu_call_inputs,
    weight_copies_for_cold_cache,
)


def gather_mm_workload(spec: CellSpec, resources: CellResources) -> Workload:
    """One expert up projection, as mlx-lm's SwitchLinear calls it.

    Mode ``gather_mm``. ``x`` is ``[T*k, 1, D]``, the weight ``w`` is
    ``[E, H, D]`` and the call is ``gather_mm(x, w.swapaxes(-1, -2),
    rhs_indices=idx, sorted_indices=True)`` with ``idx`` the sorted top-k
    experts of T tokens. Calls cycle through cache-cold routings
    (:func:`cache_cold_routings`) and, for small models, weight copies.

    With quantized experts (``spec.quantization``) the call is
    ``gather_qmm(x, w, scales, biases, rhs_indices=idx, transpose=True,
    group_size=..., bits=..., mode=..., sorted_indices=True)``, as mlx-lm's
    QuantizedSwitchLinear calls it (see :func:`quantized_gather_mm_workload`).
    """
    if spec.quantization is not None:
        return quantized_gather_mm_workload(spec, resources)
    D, H, E, k = spec.model.dims  # the names of ModelShape's docstring
    dtype = spec.dtype
    rows = spec.tokens * k
    itemsize = dtype.size
    copies = weight_copies_for_cold_cache(E * H * D * itemsize)
    weights = resources.weights.get(
        "up", lambda: random_expert_weights(E, H, D, dtype, copies, resources.seed)
    )
    routings = cache_cold_routings(resources.rng, spec.tokens, E, k)
    indices = [mx.array(routing) for routing in routings]
    x = mx.random.normal((rows, 1, D), dtype=dtype, key=mx.random.key(resources.seed + 1))
    mx.eval(indices, x)

    def inputs(call: int):
        weight = weights[(call // len(indices)) % len(weights)]
        return weight.swapaxes(-1, -2), indices[call % len(indices)]

    def call_with(op):
        def call(call_index: int) -> mx.array:
            b, rhs = inputs(call_index)
            return op(x, b, rhs_indices=rhs, sorted_indices=True)

        return call

    reference_skip_reason = gathered_reference_skip_reason(rows * D * H * mx.float32.size)
    distinct = float(np.mean([len(np.unique(routing)) for routing in routings]))
    return Workload(
        rows=rows,
        ours=call_with(mlx_moe_kernels.gather_mm),
        stock=call_with(mx.gather_mm),
        reference=None if reference_skip_reason else call_with(reference.gather_mm),
        expected=lambda: grouped_reference_gather_mm(
            x, weights[0].swapaxes(-1, -2), routings[0]
        ),
        weight_bytes_per_call=distinct * H * D * itemsize,
        flops_per_call=2.0 * rows * D * H,
        reference_skip_reason=reference_skip_reason,
    )



def switch_glu_workload(spec: CellSpec, resources: CellResources) -> Workload:
    """The whole MoE layer: gate, up, SwiGLU, down and the score-weighted sum.

    Mode ``switch_glu``. ``x`` is ``[T, D]``, gate/up ``[E, H, D]``, down
    ``[E, D, H]``, indices the top-k experts of each token and scores their
    softmax weights. Ours is the fused ``switch_glu(..., scores)``; stock is
    mlx-lm's SwitchGLU on ``mx.gather_mm`` plus the weighted sum
    (:func:`stock_switch_glu`); the reference is ``reference.switch_glu``.
    Calls cycle through cache-cold routings (:func:`cache_cold_routings`).

    With quantized experts (``spec.quantization``) gate, up and down are
    ``mx.quantize`` triples and the three take them with the format's
    ``group_size``/``bits``/``mode`` (stock on ``mx.gather_qmm``; see
    :func:`quantized_switch_glu_workload`).
    """
    if spec.quantization is not None:
        return quantized_switch_glu_workload(spec, resources)
    D, H, E, k = spec.model.dims
    dtype = spec.dtype
    tokens = spec.tokens
    itemsize = dtype.size
    gate, up, down = resources.weights.get(
        "gate_up_down",
        lambda: [
            random_expert_weights(E, H, D, dtype, 1, resources.seed)[0],
            random_expert_weights(E, H, D, dtype, 1, resources.seed + 1)[0],
            random_expert_weights(E, D, H, dtype, 1, resources.seed + 2)[0],
        ],
    )
    routings, indices, x, scores = switch_glu_call_inputs(resources, tokens, E, k, D, dtype)

    def call_with(op):
        def call(call_index: int) -> mx.array:
            return op(x, gate, up, down, indices[call_index % len(indices)], scores)

        return call

    reference_skip_reason = gathered_reference_skip_reason(3 * tokens * k * D * H * mx.float32.size)
    distinct = float(np.mean([len(np.unique(routing)) for routing in routings]))
    return Workload(
        rows=tokens * k,
        ours=call_with(mlx_moe_kernels.switch_glu),
        stock=call_with(stock_switch_glu),
        reference=None if reference_skip_reason else call_with(reference.switch_glu),
        expected=lambda: grouped_reference_switch_glu(
            x, gate, up, down, routings[0], scores
        ),
        weight_bytes_per_call=3 * distinct * H * D * itemsize,
        flops_per_call=6.0 * tokens * k * D * H,
        reference_skip_reason=reference_skip_reason,
    )


ModeFunction = Callable[[CellSpec, CellResources], Workload]

MODES: Dict[str, ModeFunction] = {
    "switch_glu": switch_glu_workload,
    "gather_mm": gather_mm_workload,
}
"""Benchmark modes by name: each builds the :class:`Workload` of a cell. The
first line of a mode function's docstring is its summary in ``--help``."""


def mode_summary(mode: str) -> str:
    """The first line of a mode function's docstring."""
    doc = MODES[mode].__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


DEFAULT_MODE = "switch_glu"
"""The mode ``mlx-moe bench`` runs when none is named."""
