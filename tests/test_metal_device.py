"""gather_mm and the fused SwitchGLU on a real Apple GPU: our Metal kernels
through the Metal dispatch (csrc/metal/*.cpp), against the float64 oracle
(gather_mm: conftest's bound; switch_glu: test_switch_glu's accuracy rule).

Runs only where MLX has a Metal GPU (a Mac with Apple silicon and this
package built there, which builds the metallib); everywhere else every test
here is skipped, and the kernels are covered by the simulator tests
(test_metal_*.py) and the host check (test_metal_host.py). These tests have
never run in this project's CI (no Mac): see docs/metal.md.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe_kernels
from conftest import FLOAT_DTYPES, assert_close_to_exact, dtype_id, indices, rand, to_f64
from test_switch_glu import D, assert_accurate, make_problem

pytestmark = pytest.mark.skipif(not mx.metal.is_available(), reason="needs an Apple GPU (MLX's Metal backend)")

switch_glu = mlx_moe_kernels.switch_glu
DTYPE_PARAMS = [pytest.param(d, id=dtype_id(d)) for d in FLOAT_DTYPES]

# (tokens, k, E): the decode kernels (rows per expert <= 8, planned from
# T * k), the prefill kernels (more rows), scores with > 128 tokens (the
# scratch + combine launch), and ragged experts.
SIZES = [(1, 1, 4), (1, 8, 128), (2, 4, 8), (7, 4, 16), (64, 8, 128), (300, 2, 4), (300, 8, 64)]


@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
@pytest.mark.parametrize("tokens,k,E", SIZES, ids=[f"T{t}-k{k}-E{e}" for t, k, e in SIZES])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_gpu_matches_reference_and_oracle(dtype, tokens, k, E, with_scores):
    p = make_problem(tokens, k, E, dtype, seed=tokens + k + E)
    out = switch_glu(*p.args(with_scores), stream=mx.gpu)
    assert out.shape == ((tokens, D) if with_scores else (tokens, k, D))
    assert_accurate(out, p, with_scores)


@pytest.mark.parametrize("pattern", ["one_expert", "repeat_in_token", "skewed", "with_replacement"])
@pytest.mark.parametrize("tokens,k,E", [(1, 4, 8), (64, 4, 16), (300, 1, 32)])
def test_gpu_ragged_routing(tokens, k, E, pattern):
    p = make_problem(tokens, k, E, mx.bfloat16, pattern=pattern, seed=3)
    assert_accurate(switch_glu(*p.args(False), stream=mx.gpu), p, False)
    assert_accurate(switch_glu(*p.args(True), stream=mx.gpu), p, True)


def test_gpu_fused_gate_up_view_matches_separate_weights():
    """gate_up [E, 2H, D]: gate and up are strided views, copied dense by
    the dispatch."""
    p = make_problem(9, 2, 8, mx.float16, seed=5)
    gate_up = mx.concatenate([p.gate, p.up], axis=1)
    fused = switch_glu(p.x, None, gate_up, p.down, p.indices, p.scores, stream=mx.gpu)
    separate = switch_glu(*p.args(True), stream=mx.gpu)
    mx.eval(fused, separate)
    np.testing.assert_array_equal(to_f64(fused), to_f64(separate))


def lazy_indices(values) -> mx.array:
    """Indices that are still a graph node when the op is called (evaluated
    indices are range-checked at the call, on every device)."""
    return mx.array(np.asarray(values, np.uint32)) + mx.array(0, mx.uint32)


def test_gpu_out_of_range_index_gives_nan():
    """A GPU cannot raise mid-evaluation: a bad expert id makes every output NaN."""
    p = make_problem(3, 2, 4, mx.float32, seed=1)
    bad = lazy_indices([[0, 1], [2, 9], [1, 3]])
    out = switch_glu(p.x, p.gate, p.up, p.down, bad, p.scores, stream=mx.gpu)
    assert np.isnan(np.array(out)).all()


# ------------------------------------------------------------ gather_mm
gather_mm = mlx_moe_kernels.gather_mm


@pytest.mark.parametrize("tokens,k,E", [(1, 8, 64), (3, 2, 8), (40, 4, 16), (300, 2, 4)])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_gpu_gather_mm_switch_linear_layout(dtype, tokens, k, E):
    """mlx-lm's SwitchLinear call: x [T, 1, 1, K], w [E, N, K] transposed (no copy)."""
    N, K = 40, 72
    x = rand((tokens, 1, 1, K), dtype, 1)
    w = rand((E, N, K), dtype, 2, K**-0.5)
    rng = np.random.default_rng(tokens)
    idx = indices(np.stack([rng.permutation(E)[:k] for _ in range(tokens)]))
    b = mx.swapaxes(w, -1, -2)
    out = gather_mm(x, b, rhs_indices=idx, stream=mx.gpu)
    assert_close_to_exact(out, x, b, None, idx)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_gpu_gather_mm_general(dtype):
    """M = 3 rows per index, random lhs and rhs with repeats, b row-major [E, K, N] (copied)."""
    a = rand((5, 3, 24), dtype, 3)
    b = rand((6, 24, 20), dtype, 4)
    rng = np.random.default_rng(7)
    lhs = indices(rng.integers(0, 5, (4, 7)))
    rhs = indices(rng.integers(0, 6, (4, 7)))
    out = gather_mm(a, b, lhs, rhs, stream=mx.gpu)
    assert_close_to_exact(out, a, b, lhs, rhs)


def test_gpu_gather_mm_bad_ids_give_nan():
    a = rand((4, 2, 16), mx.float32, 5)
    b = rand((3, 16, 8), mx.float32, 6)
    good = lazy_indices([0, 1, 2, 1])
    bad_lhs = gather_mm(a, b, lazy_indices([0, 9, 2, 1]), good, stream=mx.gpu)
    rows = np.array(bad_lhs)
    assert np.isnan(rows[1]).all() and np.isfinite(np.delete(rows, 1, axis=0)).all()
    bad_rhs = gather_mm(a, b, lazy_indices([0, 1, 2, 3]), lazy_indices([0, 1, 7, 1]), stream=mx.gpu)
    assert np.isnan(np.array(bad_rhs)).all()


def test_gpu_many_experts_falls_back_to_mlx():
    """E above the routing kernel's 512: MLX's gather_mm on the GPU, same results."""
    p = make_problem(4, 2, 600, mx.float32, seed=2)
    assert_accurate(switch_glu(*p.args(True), stream=mx.gpu), p, True)


def test_gpu_matches_cpu_kernels_closely():
    """The Metal and CPU kernels agree to float32 accumulation noise."""
    p = make_problem(16, 4, 32, mx.float32, pattern="with_replacement", seed=4)
    gpu = switch_glu(*p.args(True), stream=mx.gpu)
    cpu = switch_glu(*p.args(True), stream=mx.cpu)
    np.testing.assert_allclose(np.array(gpu), np.array(cpu), rtol=1e-5, atol=1e-5)



# ------------------------------------------------------------ gather_qmm
def assert_close_relative(ours: mx.array, theirs: mx.array, tol: float):
    """Elementwise within ``tol`` of the largest output (the comparisons
    below are against our CPU path, which rounds 16-bit outputs at other
    points of the computation)."""
    a, b = to_f64(ours), to_f64(theirs)
    assert a.shape == b.shape and np.isfinite(a).all()
    assert np.abs(a - b).max() <= tol * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())
@pytest.mark.parametrize("bits,group_size,mode", [(4, 64, "affine"), (8, 32, "affine"), (3, 128, "affine"), (4, 32, "mxfp4")])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_gpu_gather_qmm_decode(dtype, bits, group_size, mode):
    """One token, top-8 (the decode kernel): against our CPU kernels (checked
    against a float64 oracle in test_gather_qmm.py)."""
    E, N, K = 16, 40, 256
    x = rand((1, 1, 1, K), dtype, 1)
    w = rand((E, N, K), mx.float32, 2, K**-0.5)
    packed = mx.quantize(w, group_size=group_size, bits=bits, mode=mode)
    scales = packed[1] if mode == "mxfp4" else packed[1].astype(dtype)
    biases = None if mode == "mxfp4" else packed[2].astype(dtype)
    idx = indices(np.random.default_rng(0).permutation(E)[:8].reshape(1, 8))
    args = (x, packed[0], scales, biases, None, idx)
    kw = dict(transpose=True, group_size=group_size, bits=bits, mode=mode)
    ours = mlx_moe_kernels.gather_qmm(*args, **kw, stream=mx.gpu)
    theirs = mlx_moe_kernels.gather_qmm(*args, **kw, stream=mx.cpu)
    assert_close_relative(ours, theirs, 1e-4 if dtype == mx.float32 else 1e-2)


def test_gpu_gather_qmm_prefill():
    """More than 8 rows per expert: the quantized prefill kernel."""
    x = rand((20, 1, 1, 128), mx.float16, 3)
    wq, s, b = mx.quantize(rand((4, 32, 128), mx.float32, 4, 128**-0.5), group_size=64, bits=4)
    idx = indices(np.random.default_rng(1).integers(0, 4, (20, 2)))
    ours = mlx_moe_kernels.gather_qmm(x, wq, s, b, None, idx, transpose=True, group_size=64, bits=4, stream=mx.gpu)
    theirs = mlx_moe_kernels.gather_qmm(x, wq, s, b, None, idx, transpose=True, group_size=64, bits=4, stream=mx.cpu)
    assert_close_relative(ours, theirs, 1e-2)


# ------------------------------------------------- quantized switch_glu
@pytest.mark.parametrize("tokens", [1, 3, 40])  # fused decode kernels (T * k <= 8), then gather_qmm's
@pytest.mark.parametrize("bits,mode,group_size", [(4, "affine", 64), (8, "affine", 32), (4, "mxfp4", 32)])
def test_gpu_quantized_switch_glu(tokens, bits, mode, group_size):
    """Against the same op on the CPU (our CPU kernels, themselves checked
    against the reference in test_quantized_layers.py / test_gather_qmm.py)."""
    E, D, H, k = 8, 128, 64, 2
    x = rand((tokens, D), mx.bfloat16, 1)
    weights = []
    for i, shape in enumerate([(E, H, D), (E, H, D), (E, D, H)]):
        packed = mx.quantize(rand(shape, mx.float32, 2 + i, shape[-1] ** -0.5), group_size=group_size, bits=bits, mode=mode)
        if mode == "affine":
            packed = (packed[0], packed[1].astype(mx.bfloat16), packed[2].astype(mx.bfloat16))
        else:
            packed = (packed[0], packed[1], None)  # mxfp4: no biases
        weights.append(packed)
    rng = np.random.default_rng(tokens)
    idx = indices(np.stack([rng.permutation(E)[:k] for _ in range(tokens)]))
    scores = mx.softmax(rand((tokens, k), mx.float32, 9), axis=-1)
    kw = dict(group_size=group_size, bits=bits, mode=mode)
    gpu = switch_glu(x, weights[0], weights[1], weights[2], idx, scores, **kw, stream=mx.gpu)
    cpu = switch_glu(x, weights[0], weights[1], weights[2], idx, scores, **kw, stream=mx.cpu)
    assert_close_relative(gpu, cpu, 3e-2)
