"""Quantized experts: ``QuantizedSwitchLinear`` and the quantized
``SwitchGLU`` against mlx-lm's layers (on ``mx.gather_qmm``) and the
plain-MLX reference, for affine 2/4/8 bits and mxfp4; what ``nn.quantize``
makes of our layers and models (Qwen3-MoE's 8-bit routers); gradients with
respect to the input; and ``mlx-moe generate --bits`` end to end.

Our layers and mlx-lm's hold the same quantized arrays (``mx.quantize`` is
deterministic), so they differ only by float32 summation order.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_moe_kernels as mk
from mlx_moe_kernels import cli, layers, reference
from mlx_moe_kernels.loading import build_model, quantize_model
from mlx_moe_kernels.models.tiny import tiny_config, write_tiny_checkpoint

from conftest import indices, rand

mlx_lm_layers = pytest.importorskip("mlx_lm.models.switch_layers")

D, H, E, K = 128, 128, 8, 2
# (mode, group_size, bits): every affine width class the kernels unpack
# differently (2, 4, 8 bits; group sizes 32, 64, 128) and mxfp4.
QUANTIZATIONS = [("affine", 32, 2), ("affine", 64, 4), ("affine", 128, 8), ("mxfp4", 32, 4)]
QUANT_IDS = ["affine2-g32", "affine4-g64", "affine8-g128", "mxfp4"]


# ------------------------------------------------------------ helpers
def routing(tokens: int, k: int = K, seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    return indices(np.stack([rng.permutation(E)[:k] for _ in range(tokens)]))


def assert_close(ours: mx.array, theirs: mx.array, rtol: float = 1e-5):
    """Same shape and dtype, equal to ``rtol`` of the largest magnitude."""
    mx.eval(ours, theirs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (ours.shape, ours.dtype, theirs.shape, theirs.dtype)
    expected = np.array(theirs.astype(mx.float32))
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)), expected, rtol=rtol, atol=rtol * scale)


def quantized_pair(quant, bias=False, seed=0):
    """Our QuantizedSwitchLinear (from a float SwitchLinear) and mlx-lm's,
    holding the same arrays."""
    mode, group_size, bits = quant
    mx.random.seed(seed)
    ours = layers.SwitchLinear(D, H, E, bias=bias)
    if bias:
        ours.bias = rand((E, H), seed=seed + 1)
    ours = ours.to_quantized(group_size, bits, mode)
    theirs = mlx_lm_layers.QuantizedSwitchLinear(D, H, E, bias, group_size, bits, mode=mode)
    theirs.load_weights(tree_flatten(ours.parameters()), strict=True)
    return ours, theirs


def quantized_glus(quant, seed=0, **kwargs):
    """Our SwitchGLU and mlx-lm's with the same float weights, both through
    ``nn.quantize`` with ``quant``."""
    mode, group_size, bits = quant
    mx.random.seed(seed)
    ours = layers.SwitchGLU(D, H, E, **kwargs)
    theirs = mlx_lm_layers.SwitchGLU(D, H, E, **kwargs)
    theirs.load_weights(tree_flatten(ours.parameters()), strict=True)
    for glu in (ours, theirs):
        nn.quantize(glu, group_size, bits, mode=mode)
    return ours, theirs


def gelu_glu(up: mx.array, gate: mx.array) -> mx.array:
    """A gated activation other than SwiGLU."""
    return nn.gelu(gate) * up


def silu_glu(up: mx.array, gate: mx.array) -> mx.array:
    """SwiGLU as a plain function: the same values, but not the activation
    type the fused kernel stands for."""
    return nn.silu(gate) * up


def quantized_tuples(glu):
    return [glu[name].quantized_weights() for name in ("gate_proj", "up_proj", "down_proj")]


# ------------------------------------------- QuantizedSwitchLinear
@pytest.mark.parametrize("quant", QUANTIZATIONS, ids=QUANT_IDS)
@pytest.mark.parametrize("sorted_indices", [False, True], ids=["unsorted", "sorted"])
def test_quantized_switch_linear_matches_mlx_lm(build, quant, sorted_indices):
    ours, theirs = quantized_pair(quant, bias=True)
    x = rand((7, 1, 1, D), seed=2)
    idx = routing(7)
    if sorted_indices:  # as mlx-lm's SwitchGLU calls it: rows grouped by expert
        flat = idx.flatten()
        order = mx.argsort(flat)
        x, idx = x.flatten(0, -3)[order // K], flat[order]
    out = ours(x, idx, sorted_indices=sorted_indices)
    assert out.shape == (*idx.shape, 1, H)
    assert_close(out, theirs(x, idx, sorted_indices=sorted_indices))


def test_quantized_switch_linear_bfloat16(build):
    """bfloat16 activations and scales: same dtype and values as mlx-lm."""
    mx.random.seed(3)
    float_layer = layers.SwitchLinear(D, H, E, bias=False)
    float_layer.weight = float_layer.weight.astype(mx.bfloat16)
    ours = float_layer.to_quantized(64, 4)
    theirs = mlx_lm_layers.QuantizedSwitchLinear(D, H, E, False, 64, 4)
    theirs.load_weights(tree_flatten(ours.parameters()), strict=True)
    x = rand((5, 1, 1, D), mx.bfloat16, seed=4)
    idx = routing(5)
    out = ours(x, idx)
    assert out.dtype == mx.bfloat16
    assert_close(out, theirs(x, idx), rtol=2e-2)


@pytest.mark.parametrize("quant", QUANTIZATIONS, ids=QUANT_IDS)
def test_parameters_like_mlx_lm_and_frozen(quant):
    ours, theirs = quantized_pair(quant, bias=True)
    shapes = lambda m: sorted((k, v.shape, v.dtype) for k, v in tree_flatten(m.parameters()))
    assert shapes(ours) == shapes(theirs)
    assert ours.weight.dtype == mx.uint32 and ours.weight.shape == (E, H, D * quant[2] // 32)
    assert ("biases" in ours) == (quant[0] == "affine")
    assert (ours.input_dims, ours.output_dims, ours.num_experts) == (D, H, E)
    assert tree_flatten(ours.trainable_parameters()) == []


def test_nn_quantize_converts_our_layers():
    """nn.quantize finds our SwitchLinear layers (they have to_quantized);
    None group size / bits take the mode's defaults; the bias is kept."""
    glu = layers.SwitchGLU(D, H, E, bias=True)
    bias = glu.up_proj.bias
    nn.quantize(glu, mode="mxfp4")
    assert all(type(glu[n]) is layers.QuantizedSwitchLinear for n in ("gate_proj", "up_proj", "down_proj"))
    assert glu.up_proj.quantization == (32, 4, "mxfp4")
    assert glu.up_proj.bias is bias
    assert layers.SwitchLinear(D, H, E).to_quantized().quantization == (64, 4, "affine")
    with pytest.raises(ValueError, match="mode"):
        layers.SwitchLinear(D, H, E).to_quantized(mode="int3")


# ------------------------------------------------ quantized SwitchGLU
@pytest.mark.parametrize("quant", QUANTIZATIONS, ids=QUANT_IDS)
@pytest.mark.parametrize("tokens", [3, 40], ids=["T3", "T40"])  # 80 >= 64 slots: mlx-lm sorts
def test_switch_glu_fused_matches_reference_and_mlx_lm(build, quant, tokens):
    mode, group_size, bits = quant
    ours, theirs = quantized_glus(quant)
    assert ours.uses_fused_kernel()
    x = rand((tokens, D), seed=5)
    idx = routing(tokens, seed=6)
    scores = mx.softmax(rand((tokens, K), seed=7), axis=-1)
    options = dict(group_size=group_size, bits=bits, mode=mode)
    ys = ours(x, idx)
    assert_close(ys, reference.switch_glu(x, *quantized_tuples(ours), idx, **options))
    assert_close(ys, theirs(x, idx))
    combined = ours(x, idx, scores)
    assert_close(combined, reference.switch_glu(x, *quantized_tuples(ours), idx, scores, **options))
    assert_close(combined, (theirs(x, idx) * scores[..., None]).sum(axis=-2))


def test_switch_glu_leading_batch_dims(build):
    ours, theirs = quantized_glus(("affine", 64, 4), seed=1)
    x = rand((2, 3, D), seed=8)
    idx = routing(6, seed=9).reshape(2, 3, K)
    assert_close(ours(x, idx), theirs(x, idx))


@pytest.mark.parametrize(
    "case", ["bias", "activation", "mixed_bits", "nvfp4"],
)
def test_switch_glu_unfused_cases_match_mlx_lm(case):
    """Biases, another activation, projections quantized differently and
    modes our kernels do not take: composed per projection, as mlx-lm."""
    mx.random.seed(10)
    kwargs = {"bias": True} if case == "bias" else {}
    if case == "activation":
        kwargs["activation"] = gelu_glu
    ours = layers.SwitchGLU(D, H, E, **kwargs)
    theirs = mlx_lm_layers.SwitchGLU(D, H, E, **kwargs)
    theirs.load_weights(tree_flatten(ours.parameters()), strict=True)
    if case == "mixed_bits":
        predicate = lambda path, m: {"group_size": 64, "bits": 8} if path == "down_proj" else hasattr(m, "to_quantized")
        for glu in (ours, theirs):
            nn.quantize(glu, 64, 4, class_predicate=predicate)
    else:
        mode = "nvfp4" if case == "nvfp4" else "affine"
        for glu in (ours, theirs):
            nn.quantize(glu, mode=mode)
    assert type(ours.gate_proj) is layers.QuantizedSwitchLinear
    assert not ours.uses_fused_kernel()
    x = rand((5, D), seed=11)
    idx = routing(5, seed=12)
    assert_close(ours(x, idx), theirs(x, idx), rtol=1e-4 if case == "activation" else 1e-5)


@pytest.mark.parametrize("quant", [QUANTIZATIONS[1], QUANTIZATIONS[3]], ids=[QUANT_IDS[1], QUANT_IDS[3]])
def test_gradient_wrt_input(build, quant):
    """Frozen quantized experts still pass gradients to their input (as
    LoRA training needs): fused and per-projection paths against the
    reference's gradient."""
    mode, group_size, bits = quant
    ours, _ = quantized_glus(quant, seed=2)
    ours.train()
    x = rand((6, D), seed=13)
    idx = routing(6, seed=14)
    scores = mx.softmax(rand((6, K), seed=15), axis=-1)
    cotangent = rand((6, D), seed=16)
    tuples = quantized_tuples(ours)
    options = dict(group_size=group_size, bits=bits, mode=mode)

    def loss_ref(x):
        return (reference.switch_glu(x, *tuples, idx, scores, **options) * cotangent).sum()

    expected = mx.grad(loss_ref)(x)
    assert_close(mx.grad(lambda x: (ours(x, idx, scores) * cotangent).sum())(x), expected, rtol=1e-4)
    unfused = layers.SwitchGLU.from_projections(ours.gate_proj, ours.up_proj, ours.down_proj, activation=silu_glu)
    assert not unfused.uses_fused_kernel()
    assert_close(mx.grad(lambda x: (unfused(x, idx, scores) * cotangent).sum())(x), expected, rtol=1e-4)


# ------------------------------------------------------------ models
def _tiny_folder(tmp_path, arch="qwen3_moe"):
    """A tiny checkpoint whose every linear (64-wide inputs) can be quantized."""
    overrides = dict(hidden_size=64, moe_intermediate_size=64, intermediate_size=64)
    if arch == "qwen2_moe":
        overrides["shared_expert_intermediate_size"] = 64
    write_tiny_checkpoint(tmp_path / arch, arch, overrides=overrides, seed=3)
    return tmp_path / arch


def test_quant_predicates_like_mlx_lm(tmp_path):
    """Qwen3-MoE and Qwen3-VL-MoE keep their routers at 8 bits (mlx-lm's
    predicate); Qwen2-MoE has no predicate (neither has mlx-lm's)."""
    model, config = mk.load_model(_tiny_folder(tmp_path))
    assert model.quant_predicate("model.layers.0.mlp.gate", None) == {"group_size": 64, "bits": 8}
    assert model.quant_predicate("model.layers.0.mlp.switch_mlp.up_proj", None) is True
    quantized = quantize_model(model, config, bits=4)
    router = model.layers[0].mlp.gate
    assert type(router) is mk.dense.QuantizedLinear and (router.bits, router.group_size) == (8, 64)
    assert quantized["quantization"]["model.layers.0.mlp.gate"] == {"group_size": 64, "bits": 8}
    assert model.layers[0].mlp.switch_mlp.uses_fused_kernel()
    assert not hasattr(mk.models.qwen2_moe.Model, "quant_predicate")
    vl = build_model(tiny_config("qwen3_vl_moe"))
    assert vl.quant_predicate("language_model.model.layers.1.mlp.gate", None) == {"group_size": 64, "bits": 8}


def test_cli_generate_quantizes_on_the_fly(tmp_path, capsys):
    folder = _tiny_folder(tmp_path)
    argv = ["generate", "--model", str(folder), "--prompt", "the quick brown", "--max-tokens", "3"]
    assert cli.main(argv + ["--bits", "4", "--group-size", "64", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "[quantized on the fly: group_size 64, bits 4, mode affine (+2 layers" in out
    assert "mx.gather_qmm" in out
    difference = float(out.rsplit(":", 1)[1])
    assert difference < 1e-3
    assert cli.main(argv + ["--quant-mode", "mxfp4"]) == 0
    assert "group_size 32, bits 4, mode mxfp4" in capsys.readouterr().out
