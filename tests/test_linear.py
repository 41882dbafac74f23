"""The dense projections ``linear`` / ``quantized_linear`` and the layers
built on them (``mlx_moe_kernels.dense``), against a float64 oracle.

Float: the element-wise bound of conftest (one rounding of the output plus
float32 accumulation). Quantized: the float64 product with the
``mx.dequantize``d matrix, within the output dtype's rounding of the
activations and result (as tests/test_gather_qmm.py). Shapes cover one
row (decode), many rows (prefill tiles), a ragged last column tile,
K not a multiple of any SIMD width, leading batch dimensions and empty x.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_moe_kernels as mk
from mlx_moe_kernels import dense, reference

from conftest import DTYPE_IDS, FLOAT_DTYPES, assert_close_to_exact, rand, to_f64, ulp
from test_gather_qmm import FORMAT_IDS, FORMATS, UNIT_ROUNDOFF, quantized


def check_linear(x, w, bias=None):
    out = mk.linear(x, w, bias)
    stock = reference.linear(x, w, bias)
    assert out.dtype == stock.dtype and out.shape == stock.shape
    if bias is None:
        # x @ w.T as a batched product over x's flattened rows.
        x2 = x.reshape(1, -1, x.shape[-1])
        flat = out.reshape(1, -1, w.shape[0])
        assert_close_to_exact(flat, x2, w.T[None])
    else:
        # Two roundings: the product, then the sum with the bias.
        product = to_f64(x) @ to_f64(w).T
        exact = product + to_f64(bias)
        absprod = np.abs(to_f64(x)) @ np.abs(to_f64(w)).T
        bound = ulp(product, out.dtype) + ulp(exact, out.dtype) + 4 * x.shape[-1] * 2.0**-24 * absprod + 1e-30
        assert np.all(np.abs(to_f64(out) - exact) <= bound)
    return out


# ------------------------------------------------------------------ linear
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("x_shape", [(1, 131), (5, 131), (67, 131), (2, 3, 131), (131,)], ids=str)
@pytest.mark.parametrize("N", [1, 7, 97, 300])
def test_linear_shapes_dtypes(build, dtype, x_shape, N):
    K = x_shape[-1]
    w = rand((N, K), dtype, seed=N, scale=K**-0.5)
    x = rand(x_shape, dtype, seed=len(x_shape))
    out = check_linear(x, w)
    assert out.shape == (*x_shape[:-1], N)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_linear_bias(build, dtype):
    w = rand((50, 64), dtype, seed=1, scale=0.125)
    x = rand((3, 64), dtype, seed=2)
    bias = rand((50,), dtype, seed=3)
    check_linear(x, w, bias)


def test_linear_empty_and_promotion():
    w = rand((8, 16), mx.bfloat16)
    assert mk.linear(mx.zeros((0, 16), mx.bfloat16), w).shape == (0, 8)
    # MLX's promotion: float32 activations with bfloat16 weights -> float32.
    x = rand((2, 16), mx.float32)
    out = check_linear(x, w)
    assert out.dtype == mx.float32


def test_linear_strided_input():
    # A transposed activation (as attention's output before o_proj).
    x = rand((4, 2, 32), seed=4).transpose(1, 0, 2)
    check_linear(x, rand((16, 32), seed=5))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_linear_layouts(dtype):
    # Leading axes that do not collapse into one row stride (a slice with a
    # step, a leading transpose: one gather pair per row), a transposed
    # weight view, and a weight still being computed (no contiguity known
    # at the call).
    x = rand((6, 4, 131), dtype, seed=5)[::2].transpose(1, 0, 2)
    w = rand((131, 40), dtype, seed=6).T
    check_linear(x, w)
    check_linear(rand((3, 131), dtype, seed=7), rand((40, 131), dtype, seed=8) * 2)


def test_linear_weight_gradient_over_leading_dims():
    x, w = rand((2, 3, 24), seed=1), rand((10, 24), seed=2)
    cot = rand((2, 3, 10), seed=4)
    ours = mx.grad(lambda x, w: (mk.linear(x, w) * cot).sum(), argnums=(0, 1))(x, w)
    want = mx.grad(lambda x, w: ((x @ w.T) * cot).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(ours, want):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)


def test_linear_errors():
    w = rand((8, 16))
    with pytest.raises(ValueError, match=r"\[linear\] weight must be a 2-d"):
        mk.linear(rand((2, 16)), rand((2, 8, 16)))
    with pytest.raises(ValueError, match=r"\[linear\] x's last dimension 15"):
        mk.linear(rand((2, 15)), w)
    with pytest.raises(ValueError, match=r"\[linear\] x must have at least one dimension"):
        mk.linear(mx.array(1.0), w)
    with pytest.raises(ValueError, match=r"\[linear\] Supports float32"):
        mk.linear(mx.ones((2, 16), mx.int32), mx.ones((8, 16), mx.int32))


def test_linear_gradients():
    x, w, bias = rand((3, 24), seed=1), rand((10, 24), seed=2), rand((10,), seed=3)
    cot = rand((3, 10), seed=4)

    def loss(fn):
        return lambda x, w, b: (fn(x, w, b) * cot).sum()

    ours = mx.grad(loss(mk.linear), argnums=(0, 1, 2))(x, w, bias)
    want = mx.grad(loss(reference.linear), argnums=(0, 1, 2))(x, w, bias)
    for a, b in zip(ours, want):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)


def test_linear_compiles():
    w = rand((12, 32), seed=1)
    f = mx.compile(lambda x: mk.linear(x, w))
    x = rand((3, 32), seed=2)
    np.testing.assert_allclose(np.array(f(x)), np.array(x @ w.T), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------- quantized_linear
def check_quantized(x, q, s, b, mode, group_size, bits):
    out = mk.quantized_linear(x, q, s, b, group_size, bits, mode)
    stock = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group_size, bits=bits, mode=mode)
    assert out.dtype == stock.dtype and out.shape == stock.shape
    full = to_f64(mx.dequantize(q, s, b, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32))
    x64 = to_f64(x)
    exact, absprod = x64 @ full.T, np.abs(x64) @ np.abs(full).T
    K = x.shape[-1]
    bound = (UNIT_ROUNDOFF[x.dtype] + 2 * K * 2.0**-24) * absprod + ulp(exact, out.dtype) + 1e-30
    err = np.abs(to_f64(out) - exact)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"
    return out


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_quantized_linear_formats(build, fmt, dtype, rows):
    mode, group_size, bits = fmt
    N, K = 99, 256  # a ragged last column tile
    q, s, b = quantized((N, K), mode, group_size, bits, dtype, seed=rows)
    x = rand((rows, K), dtype, seed=rows + 1)
    check_quantized(x, q, s, b, mode, group_size, bits)


def test_quantized_linear_leading_dims_and_empty(build):
    q, s, b = quantized((48, 128), "affine", 64, 4, mx.bfloat16)
    x = rand((2, 3, 128), mx.bfloat16, seed=3)
    out = check_quantized(x, q, s, b, "affine", 64, 4)
    assert out.shape == (2, 3, 48)
    assert mk.quantized_linear(mx.zeros((0, 128), mx.bfloat16), q, s, b, 64, 4).shape == (0, 48)
    one = mk.quantized_linear(x[0, 0], q, s, b, 64, 4)
    assert one.shape == (48,)


@pytest.mark.parametrize("rows", [1, 40])
def test_quantized_linear_layouts(build, rows):
    # x whose leading axes do not collapse (one gather pair per row), and a
    # weight triple still being computed at the call (the op must make it
    # contiguous, not assume it).
    q, s, b = quantized((48, 128), "affine", 64, 4, mx.bfloat16, seed=2)
    x = rand((2 * rows, 3, 128), mx.bfloat16, seed=4)[::2].transpose(1, 0, 2)
    check_quantized(x, q, s, b, "affine", 64, 4)
    lazy = [mx.concatenate([a[:24], a[24:]]) for a in (q, s, b)]
    check_quantized(x, *lazy, "affine", 64, 4)


def test_quantized_linear_gradient_wrt_x(build):
    q, s, b = quantized((40, 64), "affine", 32, 4, mx.float32)
    x, cot = rand((3, 64), seed=1), rand((3, 40), seed=2)
    g = mx.grad(lambda x: (mk.quantized_linear(x, q, s, b, 32, 4) * cot).sum())(x)
    want = mx.grad(lambda x: (mx.quantized_matmul(x, q, s, b, True, 32, 4) * cot).sum())(x)
    np.testing.assert_allclose(np.array(g), np.array(want), rtol=1e-4, atol=1e-5)


def test_quantized_linear_errors():
    q, s, b = quantized((16, 128), "affine", 64, 4, mx.float32)
    x = rand((2, 128))
    with pytest.raises(ValueError, match=r"\[quantized_linear\] x's last dimension 64"):
        mk.quantized_linear(rand((2, 64)), q, s, b, 64, 4)
    with pytest.raises(ValueError, match=r"\[quantized_linear\] w must be the 2-d packed"):
        mk.quantized_linear(x, q[None], s[None], b[None], 64, 4)
    with pytest.raises(ValueError, match=r"\[quantized_linear\] scales of w must have shape"):
        mk.quantized_linear(x, q, s[:, :1], b, 64, 4)
    with pytest.raises(ValueError, match=r"\[quantized_linear\] affine quantization needs the biases"):
        mk.quantized_linear(x, q, s, None, 64, 4)
    with pytest.raises(ValueError, match=r"\[quantized_linear\] w must be the uint32"):
        mk.quantized_linear(x, q.astype(mx.int32), s, b, 64, 4)
    with pytest.raises(ValueError, match="quantized_linear"):
        mk.quantized_linear(x, q, s, b, 64, 4, "nvfp8")


# ------------------------------------------------------------------ layers
def test_dense_layers_match_mlx():
    mx.random.seed(0)
    ours = dense.Linear(64, 40, bias=True)
    theirs = nn.Linear(64, 40, bias=True)
    theirs.update(ours.parameters())
    x = rand((3, 64), seed=1)
    np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), rtol=1e-5, atol=1e-5)

    for bits, mode, group_size in [(4, "affine", 64), (8, "affine", 32), (4, "mxfp4", 32)]:
        q = ours.to_quantized(group_size, bits, mode)
        q_theirs = theirs.to_quantized(group_size, bits, mode)
        assert type(q) is dense.QuantizedLinear
        assert (q.group_size, q.bits, q.mode) == (q_theirs.group_size, q_theirs.bits, q_theirs.mode)
        np.testing.assert_array_equal(np.array(q.weight), np.array(q_theirs.weight))
        np.testing.assert_allclose(np.array(q(x)), np.array(q_theirs(x)), rtol=1e-4, atol=1e-4)
        assert "bias" in q and q.trainable_parameters() == {}
    # Defaults of the mode read back from the arrays.
    q = ours.to_quantized()
    assert (q.group_size, q.bits, q.mode) == (64, 4, "affine")


def test_quantized_linear_layer_other_modes_fall_back():
    ours = dense.Linear(64, 16, bias=False)
    q = ours.to_quantized(mode="mxfp8")
    theirs = nn.QuantizedLinear.from_linear(ours, mode="mxfp8")
    x = rand((2, 64), seed=3)
    np.testing.assert_allclose(np.array(q(x)), np.array(theirs(x)), rtol=1e-5, atol=1e-5)


def test_embeddings():
    emb = dense.Embedding(300, 64)
    h = rand((2, 64), seed=1)
    np.testing.assert_allclose(np.array(emb.as_linear(h)), np.array(h @ emb.weight.T), rtol=1e-5, atol=1e-5)
    qemb = emb.to_quantized(64, 4)
    assert type(qemb) is dense.QuantizedEmbedding
    theirs = nn.QuantizedEmbedding.from_embedding(emb, 64, 4)
    tokens = mx.array([[3, 299, 0]])
    np.testing.assert_array_equal(np.array(qemb(tokens)), np.array(theirs(tokens)))
    np.testing.assert_allclose(np.array(qemb.as_linear(h)), np.array(theirs.as_linear(h)), rtol=1e-4, atol=1e-4)


def test_nn_quantize_keeps_our_classes():
    model = nn.Sequential(dense.Linear(64, 64), dense.Linear(64, 32, bias=False))
    nn.quantize(model, group_size=32, bits=8)
    assert all(type(layer) is dense.QuantizedLinear for layer in model.layers)
    x = rand((2, 64))
    assert model(x).shape == (2, 32)
