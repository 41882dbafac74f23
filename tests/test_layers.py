"""Tests of mlx_moe_kernels.layers against mlx-lm's switch layers: same
constructor arguments, parameter names and shapes, checkpoints that load
either way, the same outputs and the same training gradients (float32:
mlx-lm's layers run on MLX's own gather_mm, which supports only float32 on
the CPU). Our kernels run under every CPU build (conftest's ``build``).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_moe_kernels
from mlx_moe_kernels import layers

from conftest import indices, rand

mlx_lm_layers = pytest.importorskip("mlx_lm.models.switch_layers")

D, H, E = 40, 24, 8


# ------------------------------------------------------------ helpers
def copy_parameters(source: nn.Module, target: nn.Module) -> None:
    """Load ``source``'s parameters into ``target`` by name (strict)."""
    target.load_weights(tree_flatten(source.parameters()), strict=True)


def named_shapes(module: nn.Module):
    return sorted((name, tuple(value.shape)) for name, value in tree_flatten(module.parameters()))


def routing(tokens: int, k: int, seed: int = 0, leading=None) -> mx.array:
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.permutation(E)[:k] for _ in range(tokens)])
    return indices(idx if leading is None else idx.reshape(*leading, k))


def tokens(shape, seed=1) -> mx.array:
    return rand((*shape, D), mx.float32, seed)


def assert_close(ours: mx.array, theirs: mx.array, rtol: float = 1e-5):
    mx.eval(ours, theirs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (ours.shape, theirs.shape)
    expected = np.array(theirs)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.array(ours), expected, rtol=rtol, atol=rtol * scale)


def gelu_glu(up: mx.array, gate: mx.array) -> mx.array:
    """A non-default gated activation: gelu(gate) * up."""
    return nn.gelu(gate) * up


def glu_pair(bias=False, activation=None, seed=0):
    """mlx-lm's SwitchGLU and ours holding the same weights."""
    mx.random.seed(seed)
    kwargs = {} if activation is None else {"activation": activation}
    theirs = mlx_lm_layers.SwitchGLU(D, H, E, bias=bias, **kwargs)
    if bias:  # non-zero biases, so that adding them is tested
        theirs.update(tree_map(lambda p: p + 0.1, theirs.parameters()))
    ours = layers.SwitchGLU(D, H, E, bias=bias, **kwargs)
    copy_parameters(theirs, ours)
    mx.eval(theirs.parameters(), ours.parameters())
    return theirs, ours


# ===================================================== construction
LAYER_CLASSES = ["SwitchLinear", "SwitchGLU", "SwitchMLP"]


@pytest.mark.parametrize("name", LAYER_CLASSES)
def test_constructor_signatures_match(name):
    ours = inspect.signature(getattr(layers, name).__init__).parameters
    theirs = inspect.signature(getattr(mlx_lm_layers, name).__init__).parameters
    assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in theirs.values()]
    for p in theirs.values():  # plain defaults equal; activations are documented
        if p.default is inspect.Parameter.empty or isinstance(p.default, (bool, int, float, str)):
            assert ours[p.name].default == p.default, p.name


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("name", LAYER_CLASSES)
def test_parameter_names_and_shapes_match(name, bias):
    ours = getattr(layers, name)(D, H, E, bias=bias)
    theirs = getattr(mlx_lm_layers, name)(D, H, E, bias=bias)
    assert named_shapes(ours) == named_shapes(theirs)
    for (_, a), (_, b) in zip(tree_flatten(ours.parameters()), tree_flatten(theirs.parameters())):
        assert a.dtype == b.dtype


def test_switch_linear_initialisation():
    layer = layers.SwitchLinear(D, H, E)
    assert layer.weight.shape == (E, H, D) and layer.bias.shape == (E, H)
    assert (layer.input_dims, layer.output_dims, layer.num_experts) == (D, H, E)
    assert float(mx.abs(layer.weight).max()) <= D**-0.5
    assert float(mx.abs(layer.bias).max()) == 0.0
    assert "bias" not in layers.SwitchLinear(D, H, E, bias=False)


def test_from_weights_shares_arrays():
    weight, bias = rand((E, H, D)), rand((E, H))
    layer = layers.SwitchLinear.from_weights(weight, bias)
    assert layer.weight is weight and layer.bias is bias
    gate, up, down = (layers.SwitchLinear.from_weights(rand(s)) for s in [(E, H, D), (E, H, D), (E, D, H)])
    glu = layers.SwitchGLU.from_projections(gate, up, down)
    assert glu.gate_proj is gate and glu.up_proj is up and glu.down_proj is down
    assert glu.uses_fused_kernel()


def test_load_mlx_lm_checkpoint_file(tmp_path):
    """A checkpoint saved from mlx-lm's layer loads into ours and back."""
    theirs, _ = glu_pair(seed=3)
    path = str(tmp_path / "experts.safetensors")
    theirs.save_weights(path)
    ours = layers.SwitchGLU(D, H, E)
    ours.load_weights(path)
    for (name, a), (_, b) in zip(tree_flatten(ours.parameters()), tree_flatten(theirs.parameters())):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=name)
    back = str(tmp_path / "ours.safetensors")
    ours.save_weights(back)
    mlx_lm_layers.SwitchGLU(D, H, E).load_weights(back)


# =========================================================== outputs
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_switch_linear_matches(build, bias):
    mx.random.seed(4)
    theirs = mlx_lm_layers.SwitchLinear(D, H, E, bias=bias)
    if bias:
        theirs.bias = rand((E, H), mx.float32, 5)
    ours = layers.SwitchLinear(D, H, E, bias=bias)
    copy_parameters(theirs, ours)
    x = tokens((6, 1, 1))  # [T, 1, 1, D] as SwitchGLU passes it
    idx = routing(6, 2)
    assert_close(ours(x, idx), theirs(x, idx))
    flat = idx.flatten()
    order = mx.argsort(flat)
    rows = x.reshape(6, 1, D)[order // 2]
    assert_close(ours(rows, flat[order], sorted_indices=True), theirs(rows, flat[order], sorted_indices=True))


# (token shape, k): decode, a few tokens, mlx-lm's sorting path
# (indices.size >= 64), and leading batch dimensions.
TOKEN_SHAPES = [((1,), 2), ((7,), 4), ((40,), 2), ((2, 5), 2)]


@pytest.mark.parametrize("shape,k", TOKEN_SHAPES, ids=["T1", "T7", "T40_sorted", "B2xL5"])
@pytest.mark.parametrize(
    "variant", ["default", "mlx_lm_swiglu", "bias", "custom_activation"]
)
def test_switch_glu_matches(build, variant, shape, k):
    if variant == "bias":
        theirs, ours = glu_pair(bias=True)
    elif variant == "custom_activation":
        theirs, ours = glu_pair(activation=gelu_glu)
    elif variant == "mlx_lm_swiglu":
        theirs, ours = glu_pair(activation=mlx_lm_layers.SwiGLU())
    else:
        theirs, ours = glu_pair()
    assert ours.uses_fused_kernel() == (variant in ("default", "mlx_lm_swiglu"))
    x = tokens(shape)
    idx = routing(int(np.prod(shape)), k, leading=shape)
    expected = theirs(x, idx)
    assert_close(ours(x, idx), expected)
    scores = mx.softmax(rand((*shape, k), mx.float32, 6), axis=-1)
    assert_close(ours(x, idx, scores), (expected * scores[..., None]).sum(axis=-2))


@pytest.mark.parametrize("shape,k", TOKEN_SHAPES, ids=["T1", "T7", "T40_sorted", "B2xL5"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_switch_mlp_matches(build, bias, shape, k):
    mx.random.seed(7)
    theirs = mlx_lm_layers.SwitchMLP(D, H, E, bias=bias)
    ours = layers.SwitchMLP(D, H, E, bias=bias)
    copy_parameters(theirs, ours)
    x = tokens(shape)
    idx = routing(int(np.prod(shape)), k, leading=shape)
    assert_close(ours(x, idx), theirs(x, idx))


def test_switch_glu_half_precision(build):
    """bfloat16 and float16 weights run on the fused kernel (mlx-lm's layer
    cannot on the CPU); compared with ours in float32 on the same values."""
    _, ours32 = glu_pair(seed=8)
    x = tokens((9,))
    idx = routing(9, 2)
    for dtype, tol in ((mx.float16, 4e-3), (mx.bfloat16, 3e-2)):
        ours = layers.SwitchGLU(D, H, E)
        ours.update(tree_map(lambda p: p.astype(dtype), ours32.parameters()))
        out = ours(x.astype(dtype), idx)
        assert out.dtype == dtype
        ours32_rounded = layers.SwitchGLU(D, H, E)
        ours32_rounded.update(tree_map(lambda p: p.astype(dtype).astype(mx.float32), ours32.parameters()))
        exact = ours32_rounded(x.astype(dtype).astype(mx.float32), idx)
        assert_close(out.astype(mx.float32), exact, rtol=tol)


def test_quantized_projections(build):
    """nn.quantize swaps our SwitchLinear for our QuantizedSwitchLinear; the
    layer then runs the fused op on the quantized weights, with mlx-lm's
    result (more cases in test_quantized_layers.py). (Quantization groups
    are 32 wide: dims 64 and 32 here.)"""
    mx.random.seed(9)
    theirs = mlx_lm_layers.SwitchGLU(64, 32, E)
    ours = layers.SwitchGLU(64, 32, E)
    copy_parameters(theirs, ours)
    nn.quantize(theirs, group_size=32, bits=8)
    nn.quantize(ours, group_size=32, bits=8)
    assert type(ours.gate_proj) is layers.QuantizedSwitchLinear
    assert ours.uses_fused_kernel()
    x = rand((5, 64), mx.float32, 1)
    idx = routing(5, 2)
    assert_close(ours(x, idx), theirs(x, idx))


def test_works_without_mlx_lm():
    """mlx-lm is optional: with it unimportable the layers still work."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["mlx_lm"] = None  # any import of mlx_lm now fails
        import mlx.core as mx, mlx_moe_kernels as m
        layer = m.SwitchGLU(16, 8, 4)
        assert layer.uses_fused_kernel()
        out = layer(mx.ones((3, 16)), mx.array([[0, 1], [2, 3], [1, 1]]))
        mx.eval(out)
        assert out.shape == (3, 2, 16)
        assert "mlx_lm.models.switch_layers" not in sys.modules
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


# ========================================================== training
def _loss(model, x, idx, scores, target):
    if scores is None:
        out = model(x, idx)
    elif isinstance(model, layers.SwitchGLU):
        out = model(x, idx, scores)
    else:
        out = (model(x, idx) * scores[..., None]).sum(axis=-2)
    return ((out - target) ** 2).mean()


@pytest.mark.parametrize("with_scores", [False, True], ids=["no_scores", "scores"])
@pytest.mark.parametrize("variant", ["default", "bias", "mlp"])
def test_training_gradients_match(build, variant, with_scores):
    """nn.value_and_grad gives every weight a gradient equal to mlx-lm's,
    and a few SGD steps lower the loss."""
    if variant == "mlp":
        mx.random.seed(10)
        theirs, ours = mlx_lm_layers.SwitchMLP(D, H, E), layers.SwitchMLP(D, H, E)
        copy_parameters(theirs, ours)
    else:
        theirs, ours = glu_pair(bias=variant == "bias", seed=10)
    x = tokens((12,))
    idx = routing(12, 3, seed=2)
    scores = mx.softmax(rand((12, 3), mx.float32, 11), axis=-1) if with_scores else None
    target = rand((12, D) if with_scores else (12, 3, D), mx.float32, 12)

    loss_ours, grads_ours = nn.value_and_grad(ours, _loss)(ours, x, idx, scores, target)
    loss_theirs, grads_theirs = nn.value_and_grad(theirs, _loss)(theirs, x, idx, scores, target)
    np.testing.assert_allclose(loss_ours.item(), loss_theirs.item(), rtol=1e-5)
    ours_flat, theirs_flat = tree_flatten(grads_ours), tree_flatten(grads_theirs)
    assert [n for n, _ in ours_flat] == [n for n, _ in theirs_flat]
    for (name, g), (_, r) in zip(ours_flat, theirs_flat):
        assert float(mx.abs(g).max()) > 0, f"no gradient reaches {name}"
        expected = np.array(r)
        np.testing.assert_allclose(np.array(g), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(), err_msg=name)

    step = nn.value_and_grad(ours, _loss)
    losses = []
    for _ in range(3):
        loss, grads = step(ours, x, idx, scores, target)
        ours.update(tree_map(lambda p, g: p - 0.5 * g, ours.parameters(), grads))
        losses.append(loss.item())
    assert losses[2] < losses[0]


def test_frozen_layer_gets_no_gradient(build):
    _, ours = glu_pair(seed=13)
    ours.gate_proj.freeze()
    x, idx = tokens((4,)), routing(4, 2)
    target = rand((4, 2, D), mx.float32, 14)
    _, grads = nn.value_and_grad(ours, _loss)(ours, x, idx, None, target)
    names = [n for n, _ in tree_flatten(grads)]
    assert sorted(names) == ["down_proj.weight", "up_proj.weight"]


def test_public_api_exports():
    for name in ["switch_glu", "route", "gather_mm", "SwitchLinear", "SwitchGLU", "SwitchMLP", "patch", "unpatch"]:
        assert name in mlx_moe_kernels.__all__
        assert getattr(mlx_moe_kernels, name).__doc__
