"""First-use checks of our GPU kernels.

No Mac has run our Metal kernels yet (they are tested in a Metal-on-CPU
simulator), so before the first use of a kernel family on a GPU in a
process, :func:`kernel_family_ok` runs it on a few small inputs against a
float64 oracle (:mod:`mlx_moe_kernels.selftest`'s cases) on that GPU. Any
failure - an exception (a metallib that does not load, a missing kernel
function, a pipeline whose thread limit is below the launch plan) or a
wrong result - is reported once, as a warning naming the cause, and the
family then runs on MLX's own ops in this process: a user never gets a
failed evaluation or wrong numbers because our GPU path could not run.

The CPU kernels are not checked at run time (CI tests them on every
build). Checked so far: ``switch_glu`` (the fused MoE layer, float and
4-bit), which :class:`mlx_moe_kernels.SwitchGLU` consults; the other ops'
GPU paths are not yet guarded.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Tuple

import mlx.core as mx
import numpy as np

from mlx_moe_kernels.dispatch import device_name, is_cpu

FAMILIES: Dict[str, List[str]] = {
    # family -> the selftest cases that exercise it
    "switch_glu": ["switch_glu", "switch_glu (4-bit)"],
}
TOLERANCE = 1e-4  # float32 cases

_results: Dict[Tuple[str, str], bool] = {}


def run_family_check(family: str, device) -> Tuple[bool, str]:
    """Run ``family``'s cases on ``device``: ``(True, "")``, or ``(False,
    cause)`` for an exception or a result off the oracle."""
    from mlx_moe_kernels import selftest

    cases: Dict[str, Callable] = selftest._families(mx.float32, np.random.default_rng(0))
    for case in FAMILIES[family]:
        try:
            ours, _, want = cases[case](device)
            error = selftest._error(ours, want)
        except Exception as exc:  # a kernel that cannot run: any failure counts
            return False, f"{case} raised {type(exc).__name__}: {exc}"
        if not np.isfinite(error) or error > TOLERANCE:
            return False, f"{case} gave a wrong result (error {error:.3g} against a float64 oracle)"
    return True, ""


def kernel_family_ok(family: str, device) -> bool:
    """Whether our kernels of ``family`` may run on ``device``: always on the
    CPU; on a GPU, the result of the first-use check (run once per process
    and device, with one warning when it fails)."""
    if is_cpu(device):
        return True
    key = (family, device_name(device))
    if key not in _results:
        ok, cause = run_family_check(family, device)
        if not ok:
            warnings.warn(
                f"mlx-moe-kernels: our {family} kernels failed their first-use check on {key[1]} ({cause}); "
                f"{family} uses MLX's own ops in this process. Please report it with the output of "
                "`mlx-moe selftest`.",
                RuntimeWarning,
                stacklevel=3,
            )
        _results[key] = ok
    return _results[key]


def reset() -> None:
    """Forget every check (tests; a process normally checks once)."""
    _results.clear()
