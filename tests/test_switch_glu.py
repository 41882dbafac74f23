"""Tests of mlx_moe_kernels.switch_glu (the fused SwitchGLU op) and
mlx_moe_kernels.route against mlx_moe_kernels.reference and a float64
NumPy oracle, under every CPU kernel build (conftest's ``build`` fixture).

Accuracy rule (flash-attention's): both our result and the reference's
(mlx-lm's formula in the same dtype) are compared with the float64 oracle,
and ours must be at most twice as far from it as the reference, plus twice
a worst-case float32 accumulation bound (for float32, where both errors are
accumulation noise and the reference may be lucky). In half precision the reference rounds the
gate, the up projection, the hidden activations and the output to the dtype;
ours rounds only the hidden activations and the output, so its error is
expected to be below the reference's, never far above it.

Shapes: D = 40 and H = 24 are not multiples of the kernels' tiles.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from typing import Optional

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe_kernels
from mlx_moe_kernels import reference

from conftest import FLOAT_DTYPES, dtype_id, expected_dtype, indices, rand, to_f64

switch_glu = mlx_moe_kernels.switch_glu
route = mlx_moe_kernels.route

D, H = 40, 24
DTYPE_PARAMS = [pytest.param(d, id=dtype_id(d)) for d in FLOAT_DTYPES]
INDEX_DTYPES = [mx.int32, mx.int64, mx.uint32, mx.uint8, mx.int16]
# Unit roundoff of float32: the slack of the accuracy rule is twice the
# classic worst-case bound of float32 accumulation, propagated through the
# gate/up products, SwiGLU, the down product and the combine.
FLOAT32_UNIT = 2.0**-24


# ------------------------------------------------------------ problems
@dataclasses.dataclass
class Problem:
    """The inputs of one switch_glu call."""

    x: mx.array
    gate: mx.array
    up: mx.array
    down: mx.array
    indices: mx.array
    scores: Optional[mx.array]

    def args(self, with_scores: bool = True):
        return (self.x, self.gate, self.up, self.down, self.indices, self.scores if with_scores else None)


def make_weights(E, dtype, seed=0):
    """gate, up [E, H, D] and down [E, D, H], scaled to keep values O(1)."""
    gate = rand((E, H, D), dtype, seed + 1, D**-0.5)
    up = rand((E, H, D), dtype, seed + 2, D**-0.5)
    down = rand((E, D, H), dtype, seed + 3, H**-0.5)
    return gate, up, down


def routing(pattern: str, tokens: int, k: int, E: int, seed: int = 0) -> np.ndarray:
    """[tokens, k] expert indices of a routing pattern."""
    rng = np.random.default_rng(seed)
    if pattern == "distinct":  # top-k: k different experts per token
        return np.stack([rng.permutation(E)[:k] for _ in range(tokens)])
    if pattern == "one_expert":  # every slot of every token on the last expert
        return np.full((tokens, k), E - 1)
    if pattern == "repeat_in_token":  # each token's k slots on one expert
        return np.repeat(rng.integers(0, E, (tokens, 1)), k, axis=1)
    if pattern == "skewed":  # most slots on experts 0 and 1, upper half unused
        heavy = rng.integers(0, 2, (tokens, k))
        light = rng.integers(0, max(E // 2, 1), (tokens, k))
        return np.where(rng.random((tokens, k)) < 0.8, heavy, light)
    if pattern == "with_replacement":  # uniform, repeats allowed
        return rng.integers(0, E, (tokens, k))
    raise ValueError(pattern)


def make_problem(tokens, k, E, dtype, pattern="distinct", seed=0, index_dtype=mx.uint32, scores_dtype=None):
    gate, up, down = make_weights(E, dtype, seed)
    x = rand((tokens, D), dtype, seed + 4)
    idx = indices(routing(pattern, tokens, k, E, seed), index_dtype)
    scores = mx.softmax(rand((tokens, k), mx.float32, seed + 5), axis=-1).astype(scores_dtype or dtype)
    mx.eval(scores)
    return Problem(x, gate, up, down, idx, scores)


# ------------------------------------------------------------ oracle
def np_silu(g: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g))


def np_switch_glu(x, gate, up, down, idx, scores=None, with_float32_bound=False):
    """float64 SwitchGLU over leading dims. With ``with_float32_bound``,
    also an element-wise bound on the error of any float32-accumulating
    implementation (see ``FLOAT32_UNIT``), returned second."""
    lead, k = idx.shape[:-1], idx.shape[-1]
    x = x.reshape(-1, x.shape[-1])
    idx = idx.reshape(-1, k)
    g = np.einsum("td,tkhd->tkh", x, gate[idx])
    u = np.einsum("td,tkhd->tkh", x, up[idx])
    h = np_silu(g) * u
    y = np.einsum("tkh,tkdh->tkd", h, down[idx])
    # Error propagation: a float32 dot product of n terms errs by at most
    # n * FLOAT32_UNIT * (the sum of the absolute terms); |silu'| <= 1.1.
    ax = np.abs(x)
    g_err = D * FLOAT32_UNIT * np.einsum("td,tkhd->tkh", ax, np.abs(gate[idx]))
    u_err = D * FLOAT32_UNIT * np.einsum("td,tkhd->tkh", ax, np.abs(up[idx]))
    h_err = 1.1 * np.abs(u) * g_err + np.abs(np_silu(g)) * u_err + FLOAT32_UNIT * np.abs(h)
    abs_down = np.abs(down[idx])
    y_err = H * FLOAT32_UNIT * np.einsum("tkh,tkdh->tkd", np.abs(h), abs_down)
    y_err += np.einsum("tkh,tkdh->tkd", h_err, abs_down)
    if scores is not None:
        s = scores.reshape(-1, k)[..., None]
        y_err = (np.abs(s) * y_err).sum(axis=1) + k * FLOAT32_UNIT * (np.abs(s * y)).sum(axis=1)
        y = (s * y).sum(axis=1)
        shape = (*lead, y.shape[-1])
    else:
        shape = (*lead, k, y.shape[-1])
    if with_float32_bound:
        return y.reshape(shape), y_err.reshape(shape)
    return y.reshape(shape)


def oracle(p: Problem, with_scores: bool, with_float32_bound: bool = False):
    x, gate, up, down, idx, scores = p.args(with_scores)
    return np_switch_glu(
        to_f64(x),
        to_f64(gate),
        to_f64(up),
        to_f64(down),
        np.array(idx.astype(mx.int64)),
        None if scores is None else to_f64(scores),
        with_float32_bound=with_float32_bound,
    )


def assert_accurate(ours: mx.array, p: Problem, with_scores: bool = True):
    """Ours vs the reference and the float64 oracle (the module's rule)."""
    x, gate, up, down, idx, scores = p.args(with_scores)
    ref = reference.switch_glu(x, gate, up, down, idx, scores)
    mx.eval(ours, ref)
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    exact, float32_bound = oracle(p, with_scores, with_float32_bound=True)
    got = to_f64(ours)
    assert np.all(np.isfinite(got))
    if exact.size == 0:
        return
    err_ours = np.abs(got - exact).max()
    err_ref = np.abs(to_f64(ref) - exact).max()
    slack = 2.0 * float32_bound.max()
    assert err_ours <= 2.0 * err_ref + slack, (
        f"max error {err_ours:.3g} vs the reference's {err_ref:.3g} (slack {slack:.3g}, dtype {ours.dtype})"
    )


def assert_same(a: mx.array, b: mx.array):
    """Bit-identical results (same kernel on equal inputs)."""
    mx.eval(a, b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(to_f64(a), to_f64(b))


# ===================================================== accuracy grid
# (tokens, k, E): decode-like single tokens, odd counts, a full row tile
# count, many tokens over few experts (several rows per expert), and many
# tokens over many experts.
SIZES = [(1, 1, 4), (1, 8, 128), (2, 2, 8), (7, 4, 16), (64, 8, 128), (64, 2, 4), (300, 2, 4), (300, 8, 64)]


@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
@pytest.mark.parametrize("tokens,k,E", SIZES, ids=[f"T{t}-k{k}-E{e}" for t, k, e in SIZES])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_matches_reference_and_oracle(build, dtype, tokens, k, E, with_scores):
    p = make_problem(tokens, k, E, dtype, seed=tokens + k + E)
    out = switch_glu(*p.args(with_scores))
    expected_shape = (tokens, D) if with_scores else (tokens, k, D)
    assert out.shape == expected_shape
    assert_accurate(out, p, with_scores)


ROUTINGS = ["one_expert", "repeat_in_token", "skewed", "with_replacement"]


@pytest.mark.parametrize("pattern", ROUTINGS)
@pytest.mark.parametrize("tokens,k,E", [(1, 4, 8), (7, 2, 6), (64, 4, 16), (300, 1, 32)])
@pytest.mark.parametrize("dtype", [pytest.param(mx.float32, id="f32"), pytest.param(mx.bfloat16, id="bf16")])
def test_ragged_routing(build, dtype, tokens, k, E, pattern):
    """Unused experts, one expert taking every slot, experts repeated
    within a token."""
    p = make_problem(tokens, k, E, dtype, pattern=pattern, seed=3)
    assert_accurate(switch_glu(*p.args(False)), p, False)
    assert_accurate(switch_glu(*p.args(True)), p, True)


def test_repeated_expert_in_token_counts_twice(build):
    """A token sending two slots to one expert gets that expert's output in
    both slots, and twice in the combine."""
    p = make_problem(5, 2, 4, mx.float32, pattern="repeat_in_token", seed=8)
    y = switch_glu(*p.args(False))
    assert_same(y[:, 0], y[:, 1])
    ones = mx.ones(p.indices.shape, mx.float32)
    combined = switch_glu(p.x, p.gate, p.up, p.down, p.indices, ones)
    np.testing.assert_allclose(np.array(combined), 2 * np.array(y[:, 0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_fused_gate_up_is_identical(build, dtype):
    """gate_weight=None with up_weight = concat(gate, up) (gate rows first)
    gives exactly the separate-weights result."""
    p = make_problem(33, 4, 8, dtype, seed=5)
    gate_up = mx.concatenate([p.gate, p.up], axis=1)
    for with_scores in (False, True):
        _, _, _, _, idx, scores = p.args(with_scores)
        fused = switch_glu(p.x, None, gate_up, p.down, idx, scores)
        separate = switch_glu(p.x, p.gate, p.up, p.down, idx, scores)
        assert_same(fused, separate)
        ref = reference.switch_glu(p.x, None, gate_up, p.down, idx, scores)
        assert_same(ref, reference.switch_glu(p.x, p.gate, p.up, p.down, idx, scores))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_scores_are_the_weighted_sum(build, dtype):
    """With scores, the result is sum_j scores[..., j] * y[..., j, :] of the
    result without scores (to the output's rounding)."""
    p = make_problem(19, 4, 8, dtype, seed=6)
    y = to_f64(switch_glu(*p.args(False)))
    combined = to_f64(switch_glu(*p.args(True)))
    expected = (to_f64(p.scores)[..., None] * y).sum(axis=1)
    ulp = {mx.float32: 2.0**-23, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}[dtype]
    # y was rounded to the dtype; the combine is not: 2 ulps of each term
    bound = 2 * ulp * (np.abs(to_f64(p.scores))[..., None] * np.abs(y)).sum(axis=1) + 1e-6
    assert np.all(np.abs(combined - expected) <= bound)


@pytest.mark.parametrize(
    "x_dtype,w_dtype,s_dtype",
    [
        (mx.float16, mx.float16, mx.float32),  # scores promote the combine
        (mx.bfloat16, mx.bfloat16, mx.float16),  # bf16 + f16 -> f32
        (mx.float32, mx.bfloat16, mx.bfloat16),  # x promotes the weights
        (mx.bfloat16, mx.float32, mx.float32),
    ],
    ids=["f16-f16-f32", "bf16-bf16-f16", "f32-bf16-bf16", "bf16-f32-f32"],
)
def test_mixed_dtypes_promote(build, x_dtype, w_dtype, s_dtype):
    p = make_problem(9, 2, 4, w_dtype, seed=7, scores_dtype=s_dtype)
    p.x = p.x.astype(x_dtype)
    no_scores = switch_glu(*p.args(False))
    assert no_scores.dtype == expected_dtype(x_dtype, w_dtype)
    assert_accurate(no_scores, p, False)
    with_scores = switch_glu(*p.args(True))
    assert with_scores.dtype == expected_dtype(no_scores.dtype, s_dtype)
    assert_accurate(with_scores, p, True)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_leading_dimensions(build, dtype):
    """x [B, L, D] with indices and scores [B, L, k] is the flat call
    reshaped; a 1-d x is one token."""
    B, L, k, E = 3, 5, 2, 8
    p = make_problem(B * L, k, E, dtype, seed=9)
    x3 = p.x.reshape(B, L, D)
    idx3 = p.indices.reshape(B, L, k)
    s3 = p.scores.reshape(B, L, k)
    y3 = switch_glu(x3, p.gate, p.up, p.down, idx3)
    assert y3.shape == (B, L, k, D)
    assert_same(y3, switch_glu(*p.args(False)).reshape(B, L, k, D))
    c3 = switch_glu(x3, p.gate, p.up, p.down, idx3, s3)
    assert c3.shape == (B, L, D)
    assert_same(c3, switch_glu(*p.args(True)).reshape(B, L, D))
    one = switch_glu(p.x[0], p.gate, p.up, p.down, p.indices[0])
    assert one.shape == (k, D)
    assert_same(one, switch_glu(*p.args(False))[0])


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_non_contiguous_inputs(build, dtype):
    """Transposed, sliced and reversed views give the result of their
    contiguous copies."""
    tokens, k, E = 11, 2, 6
    p = make_problem(tokens, k, E, dtype, seed=10)
    x_view = rand((D, 2 * tokens), dtype, 20).T[::2]  # transposed, every other row
    gate_view = rand((E, D, H), dtype, 21, D**-0.5).swapaxes(1, 2)  # [E, H, D] view
    up_view = rand((2 * E, H, D + 3), dtype, 22, D**-0.5)[::-2, :, 1 : D + 1]
    down_view = rand((E, D, 2 * H), dtype, 23, H**-0.5)[:, :, ::2]
    idx_view = indices(routing("distinct", tokens, k, E, 1).T, mx.int32).T
    scores_view = p.scores.T.astype(dtype).T  # still [tokens, k], transposed storage
    views = (x_view, gate_view, up_view, down_view, idx_view, scores_view)
    copies = tuple(mx.array(np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)).astype(v.dtype) for v in views)
    for with_scores in (False, True):
        n = 6 if with_scores else 5
        assert_same(switch_glu(*views[:n]), switch_glu(*copies[:n]))
    q = Problem(*views)
    assert_accurate(switch_glu(*views), q, True)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=[dtype_id(d) for d in INDEX_DTYPES])
def test_index_dtypes(build, index_dtype):
    p = make_problem(13, 4, 8, mx.float32, seed=11)
    baseline = switch_glu(*p.args(True))
    other = switch_glu(p.x, p.gate, p.up, p.down, p.indices.astype(index_dtype), p.scores)
    assert_same(other, baseline)
    lazy = p.indices.astype(index_dtype) + 0  # computed in the graph
    assert_same(switch_glu(p.x, p.gate, p.up, p.down, lazy, p.scores), baseline)


@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
def test_zero_tokens(build, with_scores):
    p = make_problem(3, 2, 4, mx.float32, seed=12)
    empty = Problem(p.x[:0], p.gate, p.up, p.down, p.indices[:0], p.scores[:0])
    out = switch_glu(*empty.args(with_scores))
    mx.eval(out)
    assert out.shape == ((0, D) if with_scores else (0, 2, D))


def test_nan_stays_in_its_token(build):
    p = make_problem(6, 2, 4, mx.float32, seed=13)
    x = mx.where(mx.arange(6)[:, None] == 2, mx.array(float("nan")), p.x)
    out = np.array(switch_glu(x, p.gate, p.up, p.down, p.indices, p.scores))
    assert np.all(np.isnan(out[2]))
    assert np.all(np.isfinite(np.delete(out, 2, axis=0)))


# ======================================================== gradients
def _grad_problem(seed=14, pattern="with_replacement"):
    return make_problem(9, 3, 6, mx.float32, pattern=pattern, seed=seed)


def _assert_grads_close(ours, refs):
    for g, r in zip(ours, refs):
        assert g.shape == r.shape and g.dtype == r.dtype
        r64 = to_f64(r)
        scale = max(1.0, np.abs(r64).max())
        np.testing.assert_allclose(to_f64(g), r64, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("fused_gate_up", [False, True], ids=["separate", "gate_up"])
@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
def test_vjp_matches_reference(build, with_scores, fused_gate_up):
    """Gradients wrt x, every weight and the scores (float32) equal the
    reference's, for a random cotangent."""
    p = _grad_problem()
    idx = p.indices
    if fused_gate_up:
        primals = [p.x, mx.concatenate([p.gate, p.up], axis=1), p.down]

        def call(fn, x, gate_up, down, *scores):
            return fn(x, None, gate_up, down, idx, *scores)

    else:
        primals = [p.x, p.gate, p.up, p.down]

        def call(fn, x, gate, up, down, *scores):
            return fn(x, gate, up, down, idx, *scores)

    if with_scores:
        primals.append(p.scores)
    out_shape = reference.switch_glu(*p.args(with_scores)).shape
    cotangent = rand(out_shape, mx.float32, 99)
    _, ours = mx.vjp(lambda *a: call(switch_glu, *a), primals, [cotangent])
    _, refs = mx.vjp(lambda *a: call(reference.switch_glu, *a), primals, [cotangent])
    _assert_grads_close(ours, refs)


def test_value_and_grad_of_a_loss(build):
    """mx.value_and_grad over a scalar loss, gradients wrt a subset of the
    arguments; indices repeated within tokens."""
    p = _grad_problem(seed=15, pattern="repeat_in_token")

    def loss(fn):
        return lambda up, down, scores: (fn(p.x, p.gate, up, down, p.indices, scores) ** 2).sum()

    ours = mx.value_and_grad(loss(switch_glu), argnums=(0, 1, 2))(p.up, p.down, p.scores)
    refs = mx.value_and_grad(loss(reference.switch_glu), argnums=(0, 1, 2))(p.up, p.down, p.scores)
    np.testing.assert_allclose(ours[0].item(), refs[0].item(), rtol=1e-5)
    _assert_grads_close(ours[1], refs[1])


@pytest.mark.parametrize("dtype", [pytest.param(mx.float16, id="f16"), pytest.param(mx.bfloat16, id="bf16")])
def test_grad_half_precision(build, dtype):
    """Half-precision gradients have the inputs' dtype and approximate the
    float32 ones."""
    p32 = _grad_problem(seed=16)
    cast = lambda a: a.astype(dtype)
    args16 = [cast(p32.x), cast(p32.gate), cast(p32.up), cast(p32.down), cast(p32.scores)]
    args32 = [cast(a).astype(mx.float32) for a in args16]

    def loss(x, gate, up, down, scores):
        return switch_glu(x, gate, up, down, p32.indices, scores).astype(mx.float32).sum()

    grads16 = mx.grad(loss, argnums=(0, 1, 2, 3, 4))(*args16)
    grads32 = mx.grad(loss, argnums=(0, 1, 2, 3, 4))(*args32)
    tol = 3e-2 if dtype == mx.bfloat16 else 5e-3
    for g16, g32 in zip(grads16, grads32):
        assert g16.dtype == dtype
        e = to_f64(g32)
        np.testing.assert_allclose(to_f64(g16), e, rtol=tol, atol=tol * np.abs(e).max())


# ========================================================== compile
def test_compile_matches_eager(build):
    p = make_problem(7, 2, 8, mx.float32, seed=17)
    f = lambda x, i, s: switch_glu(x, p.gate, p.up, p.down, i, s)
    compiled = mx.compile(f)
    for seed in (0, 1):  # new index values, same shapes: no stale trace
        idx = indices(routing("with_replacement", 7, 2, 8, seed))
        assert_same(compiled(p.x, idx, p.scores), f(p.x, idx, p.scores))
    q = make_problem(12, 2, 8, mx.float32, seed=17)  # new shapes retrace
    assert_same(compiled(q.x, q.indices, q.scores), f(q.x, q.indices, q.scores))


def test_compile_shapeless_varying_tokens(build):
    p = make_problem(1, 2, 8, mx.float32, seed=18)
    compiled = mx.compile(lambda x, i, s: switch_glu(x, p.gate, p.up, p.down, i, s), shapeless=True)
    for tokens in (3, 11, 1):
        q = make_problem(tokens, 2, 8, mx.float32, seed=tokens)
        assert_same(compiled(q.x, q.indices, q.scores), switch_glu(q.x, p.gate, p.up, p.down, q.indices, q.scores))


# ======================================================= bad inputs
def _bad_problem():
    return make_problem(5, 2, 4, mx.float32, seed=19)


@pytest.mark.parametrize(
    "value,index_dtype",
    [(4, mx.uint32), (4, mx.int64), (200, mx.uint8), (-1, mx.int32), (-1, mx.int64), (-3, mx.int8)],
    ids=["4-u32", "4-i64", "200-u8", "neg1-i32", "neg1-i64", "neg3-i8"],
)
def test_out_of_range_evaluated_raises_at_call(value, index_dtype):
    p = _bad_problem()
    bad = np.array(routing("distinct", 5, 2, 4))
    bad[3, 1] = value
    idx = indices(bad, index_dtype)
    with pytest.raises(IndexError, match=rf"\[switch_glu\] indices holds {value}\b.*\[0, 4\)"):
        switch_glu(p.x, p.gate, p.up, p.down, idx)  # no eval: raised at the call


# Evaluating switch_glu with lazily computed out-of-range indices, many
# times, with varied values, index dtypes and scores: every evaluation must
# give NaN, and the stream must keep working. Run in a subprocess, since a
# failure of this kind is a crash or a hang rather than an exception.
_LAZY_OUT_OF_RANGE_SCRIPT = textwrap.dedent(
    """
    import mlx.core as mx, numpy as np, mlx_moe_kernels as m
    T, k, E, D, H = 5, 2, 4, 40, 24
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((T, D)).astype(np.float32))
    gate = mx.array(rng.standard_normal((E, H, D)).astype(np.float32))
    up = mx.array(rng.standard_normal((E, H, D)).astype(np.float32))
    down = mx.array(rng.standard_normal((E, D, H)).astype(np.float32))
    scores = mx.softmax(mx.array(rng.standard_normal((T, k)).astype(np.float32)), axis=-1)
    good = mx.array([[0, 1], [2, 3], [1, 0], [3, 2], [2, 1]])
    mx.eval(x, gate, up, down, scores, good)
    expected = m.reference.switch_glu(x, gate, up, down, good, scores)
    cases = [(4, mx.uint32), (4, mx.int64), (2**32 + 1, mx.int64), (-1, mx.int32), (-1, mx.int64)]
    for repeat in range({repeats}):
        value, dtype = cases[repeat % len(cases)]
        bad = np.array(good.tolist(), dtype=np.int64)
        bad[3, 1] = value
        lazy = mx.array(bad).astype(dtype) + 0
        out = m.switch_glu(x, gate, up, down, lazy, scores if repeat % 2 else None)
        assert np.isnan(np.array(out)).all(), f"not NaN for index {{value}} ({{dtype}})"
        ok = m.switch_glu(x, gate, up, down, good, scores)
        assert mx.allclose(ok, expected, rtol=1e-4, atol=1e-4).item()
    print("OK")
    """
)


def test_out_of_range_lazy_gives_nan(build):
    """Lazily computed indices are checked by the kernel: evaluating gives a
    NaN output (never an out-of-bounds read, no exception from the CPU
    task), 200 times in one process, and the stream keeps working. (When
    the CPU task raised instead, this hung about 1 run in 40: every
    exception from a task leaks MLX's in-flight task count.)"""
    script = _LAZY_OUT_OF_RANGE_SCRIPT.format(repeats=200)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=os.environ.copy()
        )
    except subprocess.TimeoutExpired:
        pytest.fail("hung evaluating switch_glu with out-of-range lazy indices")
    assert proc.returncode == 0 and "OK" in proc.stdout, (
        f"rc={proc.returncode}\nstdout={proc.stdout[-1000:]}\nstderr={proc.stderr[-2000:]}"
    )


def _replace(args, **changes):
    names = ["x", "gate_weight", "up_weight", "down_weight", "indices", "scores"]
    values = dict(zip(names, args))
    values.update(changes)
    return [values[n] for n in names]


BAD_INPUTS = {
    # name: (changes to the arguments, the argument the message must name)
    "x_dims": (lambda p: {"x": p.x[:, :7]}, "x"),
    "x_scalar": (lambda p: {"x": mx.array(1.0), "indices": mx.array(1)}, "x"),
    "gate_shape": (lambda p: {"gate_weight": p.gate[:, :5]}, "gate_weight"),
    "up_shape": (lambda p: {"up_weight": p.up[:3]}, "up_weight"),
    "gate_up_shape": (lambda p: {"gate_weight": None}, "gate_up"),
    "down_ndim": (lambda p: {"down_weight": p.down[0]}, "down_weight"),
    "indices_tokens": (lambda p: {"indices": p.indices[:3]}, "indices"),
    "indices_ndim": (lambda p: {"indices": p.indices[None]}, "indices"),
    "indices_float": (lambda p: {"indices": p.indices.astype(mx.float32)}, "indices"),
    "k_zero": (lambda p: {"indices": p.indices[:, :0], "scores": None}, "k >= 1"),
    "k_above_E": (lambda p: {"indices": indices(np.zeros((5, 5))), "scores": None}, "k=5"),
    "scores_shape": (lambda p: {"scores": p.scores[:, :1]}, "scores"),
    "scores_int": (lambda p: {"scores": p.indices.astype(mx.int32)}, "scores"),
    "float64": (lambda p: {"x": p.x.astype(mx.float64)}, "float64"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_value_error(case):
    p = _bad_problem()
    changes, named = BAD_INPUTS[case]
    args = _replace(p.args(True), **changes(p))
    with pytest.raises(ValueError, match=r"\[switch_glu\].*" + named):
        switch_glu(*args, stream=mx.cpu)


# ============================================================ route
def _check_route(idx: mx.array, E: int):
    order, offsets = route(idx, E)
    ref_order, ref_offsets = reference.route(idx, E)
    mx.eval(order, offsets)
    assert order.dtype == mx.uint32 and offsets.dtype == mx.uint32
    assert order.shape == (idx.size,) and offsets.shape == (E + 1,)
    np.testing.assert_array_equal(np.array(order), np.array(ref_order))
    np.testing.assert_array_equal(np.array(offsets), np.array(ref_offsets))
    flat = np.array(idx.astype(mx.int64)).reshape(-1)
    np.testing.assert_array_equal(np.array(order), np.argsort(flat, kind="stable"))


@pytest.mark.parametrize("pattern", ["distinct", *ROUTINGS])
@pytest.mark.parametrize("tokens,k,E", [(1, 1, 4), (7, 4, 8), (64, 8, 128), (300, 2, 4)])
def test_route_matches_reference(build, tokens, k, E, pattern):
    _check_route(indices(routing(pattern, tokens, k, E, seed=tokens)), E)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=[dtype_id(d) for d in INDEX_DTYPES])
def test_route_index_dtypes_and_shapes(build, index_dtype):
    values = routing("with_replacement", 12, 3, 6, seed=2)
    _check_route(indices(values, index_dtype), 6)
    _check_route(indices(values.reshape(3, 4, 3), index_dtype), 6)  # leading dims
    _check_route(indices(values, index_dtype) + 0, 6)  # lazy
    _check_route(indices(values[:0], index_dtype), 6)  # empty


def test_route_bad_inputs(build):
    with pytest.raises(ValueError, match=r"\[route\].*num_experts"):
        route(indices([0, 1]), 0)
    with pytest.raises(ValueError, match=r"\[route\].*indices"):
        route(mx.array([0.0, 1.0]), 4)
    with pytest.raises(IndexError, match=r"\[route\] indices holds 4\b"):
        route(indices([0, 4]), 4)
    order, offsets = route(indices([0, 4]) + 0, 4)  # lazy: no exception during eval
    assert np.all(np.array(offsets) == 0xFFFFFFFF)
