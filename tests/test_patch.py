"""Tests of mlx_moe_kernels.patch / unpatch on tiny random mlx-lm models:
Qwen2-MoE, Qwen3-MoE and Qwen3-VL-MoE (its text model, which mlx-lm builds
from qwen3_moe), float and quantized with mlx-lm's own quantize_model (as
``mlx_lm.convert -q`` does). The patched model must give the unpatched
logits (float32 tolerance), share every expert array (weights, quantization
scales and biases), and unpatch must restore the original objects and
logits exactly. Quantization modes our kernels do not take stay mlx-lm's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_moe_kernels
from mlx_moe_kernels import layers

pytest.importorskip("mlx_lm.models.qwen3_moe")
from mlx_lm.models import qwen2_moe, qwen3_moe, qwen3_vl_moe  # noqa: E402
from mlx_lm.models import switch_layers  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

VOCAB = 128
QWEN3_TEXT = dict(
    model_type="qwen3_moe",
    hidden_size=64,
    num_hidden_layers=3,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    decoder_sparse_step=1,
    mlp_only_layers=[1],  # layer 1 is a dense MLP: 2 MoE layers of 3
    moe_intermediate_size=32,
    rms_norm_eps=1e-6,
    vocab_size=VOCAB,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    max_position_embeddings=256,
    norm_topk_prob=True,
)
QWEN2 = dict(
    model_type="qwen2_moe",
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=6,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
    rms_norm_eps=1e-6,
    vocab_size=VOCAB,
)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ARCHS = ["qwen2_moe", "qwen3_moe", "qwen3_moe_unnormalised", "qwen3_vl_moe"]
# The number of SwitchGLU (MoE) layers in each tiny model.
MOE_LAYERS = {"qwen2_moe": 2, "qwen3_moe": 2, "qwen3_moe_unnormalised": 2, "qwen3_vl_moe": 2}


def build_model(arch: str, seed: int = 0) -> nn.Module:
    """A tiny mlx-lm model with random, evaluated float32 weights."""
    mx.random.seed(seed)
    if arch == "qwen2_moe":
        model = qwen2_moe.Model(qwen2_moe.ModelArgs.from_dict(QWEN2))
    elif arch == "qwen3_moe":
        model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(QWEN3_TEXT))
    elif arch == "qwen3_moe_unnormalised":  # top-k scores not renormalised
        model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict({**QWEN3_TEXT, "norm_topk_prob": False}))
    elif arch == "qwen3_vl_moe":  # text model only; mlx-lm builds no vision tower
        args = qwen3_vl_moe.ModelArgs(model_type="qwen3_vl_moe", text_config=dict(QWEN3_TEXT))
        model = qwen3_vl_moe.Model(args)
    else:
        raise ValueError(arch)
    # Routers with larger weights, so that routing is decisive (no near-ties
    # that float rounding could flip) and scores are not all equal.
    for block in sparse_blocks(model):
        block.gate.weight = block.gate.weight * 8
    mx.eval(model.parameters())
    return model


def sparse_blocks(model: nn.Module):
    return [m for _, m in model.named_modules() if "switch_mlp" in m]


def prompt(batch: int = 2, length: int = 37, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB, (batch, length)))


def logits(model: nn.Module, tokens: mx.array) -> np.ndarray:
    out = model(tokens)
    mx.eval(out)
    return np.array(out.astype(mx.float32))


def assert_logits_close(got: np.ndarray, expected: np.ndarray, rtol: float):
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale)


# ============================================================= patch
@pytest.mark.parametrize("arch", ARCHS)
def test_patched_logits_match(build, arch):
    model = build_model(arch)
    tokens = prompt()  # 74 tokens: mlx-lm's SwitchGLU sorts (>= 64 slots)
    before = logits(model, tokens)
    blocks = sparse_blocks(model)
    original_classes = [type(b) for b in blocks]
    original_experts = [b.switch_mlp for b in blocks]

    assert mlx_moe_kernels.patch(model) == MOE_LAYERS[arch]
    for block, cls, theirs in zip(blocks, original_classes, original_experts):
        ours = block.switch_mlp
        assert type(ours) is layers.SwitchGLU and ours.uses_fused_kernel()
        assert isinstance(block, cls) and type(block) is not cls  # the fused subclass
        assert ours.activation is theirs.activation
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert ours[name].weight is theirs[name].weight  # shared, not copied
    assert_logits_close(logits(model, tokens), before, rtol=1e-4)
    decode = prompt(1, 1, seed=3)  # a single token
    unpatched = build_model(arch)
    assert_logits_close(logits(model, decode), logits(unpatched, decode), rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_exactly(build, arch):
    model = build_model(arch)
    tokens = prompt()
    before = logits(model, tokens)
    blocks = sparse_blocks(model)
    original = [(type(b), b.switch_mlp) for b in blocks]
    mlx_moe_kernels.patch(model)
    assert mlx_moe_kernels.unpatch(model) == MOE_LAYERS[arch]
    for block, (cls, experts) in zip(blocks, original):
        assert type(block) is cls
        assert block.switch_mlp is experts
        assert type(experts.gate_proj) is switch_layers.SwitchLinear
    np.testing.assert_array_equal(logits(model, tokens), before)
    assert mlx_moe_kernels.unpatch(model) == 0


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_patch_twice_is_a_no_op(build, arch):
    model = build_model(arch)
    tokens = prompt(1, 9)
    assert mlx_moe_kernels.patch(model) == MOE_LAYERS[arch]
    once = logits(model, tokens)
    classes = [type(b) for b in sparse_blocks(model)]
    experts = [b.switch_mlp for b in sparse_blocks(model)]
    assert mlx_moe_kernels.patch(model) == 0
    assert [type(b) for b in sparse_blocks(model)] == classes
    assert [b.switch_mlp for b in sparse_blocks(model)] == experts
    np.testing.assert_array_equal(logits(model, tokens), once)
    assert mlx_moe_kernels.unpatch(model) == MOE_LAYERS[arch]
    assert all(type(b.switch_mlp) is switch_layers.SwitchGLU for b in sparse_blocks(model))


def test_parameters_unchanged(build):
    """The same parameter names, shapes and arrays: checkpoints load the
    same before and after patching."""
    model = build_model("qwen3_moe")
    before = tree_flatten(model.parameters())
    mlx_moe_kernels.patch(model)
    after = tree_flatten(model.parameters())
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))


# ========================================================= quantized
def quantize(model: nn.Module, group_size=None, bits=None, mode="affine", quant_predicate=None):
    """Quantize as ``mlx_lm.convert -q`` does: mlx-lm's quantize_model, which
    calls nn.quantize with the model's quant_predicate (or the given one)
    and skips layers whose input size is not a multiple of the group size.
    Returns the model."""
    from mlx_lm.utils import quantize_model

    quantize_model(model, {}, group_size, bits, mode=mode, quant_predicate=quant_predicate)
    mx.eval(model.parameters())
    return model


def down_proj_8_bits(model: nn.Module):
    """A mixed-precision recipe on top of the model's own predicate:
    down_proj with 8 bits, the rest as the model's predicate says."""
    own = getattr(model, "quant_predicate", None)

    def predicate(path, module):
        if path.endswith("down_proj"):
            return {"group_size": 32, "bits": 8, "mode": "affine"}
        return own(path, module) if own is not None else True

    return predicate


QUANT_PROJECTION_ARRAYS = ("weight", "scales", "biases", "bias")
# id -> (arch, group_size, bits, mode, mixed-bits recipe, whether all three
# projections end up quantized alike, so that the fused kernel runs).
QUANTIZED_CASES = {
    # all projections 4-bit affine (the model's predicate: its router 8-bit)
    "qwen3_affine4": ("qwen3_moe", 32, 4, "affine", False, True),
    # group size 64 > down_proj's input size 32: mlx-lm's convert leaves
    # down_proj in float, so the layer mixes quantized and float projections
    "qwen3_affine4_float_down": ("qwen3_moe", 64, 4, "affine", False, False),
    "qwen3_mxfp4": ("qwen3_moe", None, None, "mxfp4", False, True),
    "qwen3_mixed_bits": ("qwen3_moe", 32, 4, "affine", True, False),
    "qwen2_affine8": ("qwen2_moe", 32, 8, "affine", False, True),
    "qwen3_vl_affine4": ("qwen3_vl_moe", 32, 4, "affine", False, True),
}


def build_quantized(case: str) -> nn.Module:
    arch, group_size, bits, mode, mixed, _ = QUANTIZED_CASES[case]
    model = build_model(arch)
    predicate = down_proj_8_bits(model) if mixed else None
    return quantize(model, group_size, bits, mode, quant_predicate=predicate)


@pytest.mark.parametrize("case", list(QUANTIZED_CASES))
def test_quantized_model_is_patched(build, case):
    """mlx-lm's QuantizedSwitchLinear projections (affine, mxfp4) become
    ours holding the very same arrays and format; logits match the
    unpatched quantized model; unpatch restores the original objects."""
    fused = QUANTIZED_CASES[case][-1]
    model = build_quantized(case)
    tokens = prompt()  # 74 tokens: mlx-lm's SwitchGLU sorts (>= 64 slots)
    before = logits(model, tokens)
    blocks = sparse_blocks(model)
    original_classes = [type(b) for b in blocks]
    original_experts = [b.switch_mlp for b in blocks]
    original_projections = [[e[n] for n in PROJECTIONS] for e in original_experts]
    assert any(type(p) is switch_layers.QuantizedSwitchLinear for ps in original_projections for p in ps)
    params_before = tree_flatten(model.parameters())
    trainable_before = [n for n, _ in tree_flatten(model.trainable_parameters())]

    assert mlx_moe_kernels.patch(model) == MOE_LAYERS[QUANTIZED_CASES[case][0]]
    for block, cls, theirs in zip(blocks, original_classes, original_experts):
        ours = block.switch_mlp
        assert type(ours) is layers.SwitchGLU and ours.uses_fused_kernel() == fused
        assert isinstance(block, cls) and type(block) is not cls  # the fused subclass
        for name in PROJECTIONS:
            their_linear, our_linear = theirs[name], ours[name]
            if type(their_linear) is switch_layers.QuantizedSwitchLinear:
                assert type(our_linear) is layers.QuantizedSwitchLinear
                their_format = (their_linear.group_size, their_linear.bits, their_linear.mode)
                assert our_linear.quantization == their_format
            else:
                assert type(our_linear) is layers.SwitchLinear
            assert set(our_linear) == set(their_linear)  # the same parameters
            for array in QUANT_PROJECTION_ARRAYS:
                if array in their_linear:
                    assert our_linear[array] is their_linear[array]  # shared, not copied
                else:
                    assert our_linear.get(array) is None
    params_after = tree_flatten(model.parameters())
    assert [n for n, _ in params_after] == [n for n, _ in params_before]
    assert all(a is b for (_, a), (_, b) in zip(params_after, params_before))
    assert [n for n, _ in tree_flatten(model.trainable_parameters())] == trainable_before
    assert_logits_close(logits(model, tokens), before, rtol=1e-4)
    decode = prompt(1, 1, seed=3)  # a single token
    unpatched = build_quantized(case)
    assert_logits_close(logits(model, decode), logits(unpatched, decode), rtol=1e-4)

    assert mlx_moe_kernels.unpatch(model) == MOE_LAYERS[QUANTIZED_CASES[case][0]]
    originals = zip(blocks, original_classes, original_experts, original_projections)
    for block, cls, experts, projections in originals:
        assert type(block) is cls and block.switch_mlp is experts
        assert all(experts[n] is p for n, p in zip(PROJECTIONS, projections))
    assert all(a is b for (_, a), (_, b) in zip(tree_flatten(model.parameters()), params_before))
    np.testing.assert_array_equal(logits(model, tokens), before)
    assert mlx_moe_kernels.unpatch(model) == 0


@pytest.mark.parametrize(
    "mode,group_size,bits", [("nvfp4", 16, 4), ("mxfp8", 32, 8)], ids=["nvfp4", "mxfp8"]
)
def test_unsupported_quantization_is_left_alone(mode, group_size, bits):
    """Quantization modes our kernels do not take (nvfp4, mxfp8) keep
    mlx-lm's layers, also when only one projection has such a mode."""
    model = quantize(build_model("qwen3_moe"), group_size, bits, mode)
    mixed = build_model("qwen3_moe")
    quantize(
        mixed, 32, 4, "affine",
        quant_predicate=lambda path, _: {"group_size": group_size, "bits": bits, "mode": mode}
        if path.endswith("up_proj") else True,
    )
    for m in (model, mixed):
        tokens = prompt(1, 11)
        before = logits(m, tokens)
        classes = [type(x) for _, x in m.named_modules()]
        assert mlx_moe_kernels.patch(m, dense_layers=False) == 0
        assert [type(x) for _, x in m.named_modules()] == classes
        assert all(type(b) is qwen3_moe.Qwen3MoeSparseMoeBlock for b in sparse_blocks(m))
        np.testing.assert_array_equal(logits(m, tokens), before)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_half_precision_quantized_model(build, dtype):
    """A half-precision quantized model (half scales and biases) keeps its
    dtype when patched, and is as accurate as the unpatched one: against
    the same codes with float32 scales and biases (the whole model then in
    float32), our logits' error is at most twice mlx-lm's own half-precision
    error (a whole model rounds to the half type at every layer, so a fixed
    tolerance would measure the model, not the kernels)."""
    model = build_model("qwen3_moe")
    model.set_dtype(dtype)
    quantize(model, 32, 4)
    reference_model = quantize(build_model("qwen3_moe"), 32, 4)
    reference_model.update(
        tree_map(lambda p: p.astype(mx.float32) if p.dtype == dtype else p, model.parameters())
    )
    tokens = prompt(1, 16)
    stock = logits(model, tokens)
    assert mlx_moe_kernels.patch(model) == MOE_LAYERS["qwen3_moe"]
    assert all(b.switch_mlp.uses_fused_kernel() for b in sparse_blocks(model))
    assert model(tokens).dtype == dtype
    exact = logits(reference_model, tokens)
    ours_error = np.abs(logits(model, tokens) - exact).max()
    stock_error = np.abs(stock - exact).max()
    assert ours_error <= 2 * stock_error + 1e-3 * np.abs(exact).max(), (ours_error, stock_error)


def test_quantized_switch_glu_with_bias(build):
    """A quantized mlx-lm SwitchGLU with biases: ours (composed) shares the
    bias arrays too and gives mlx-lm's output."""
    mx.random.seed(4)
    holder = nn.Module()
    holder.experts = switch_layers.SwitchGLU(64, 32, 4, bias=True)
    holder.experts.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.1, holder.experts.parameters()))
    nn.quantize(holder, group_size=32, bits=4)
    theirs = holder.experts
    x = mx.random.normal((3, 5, 64))
    indices = mx.array(np.random.default_rng(2).integers(0, 4, (3, 5, 2)))
    expected = theirs(x, indices)
    assert mlx_moe_kernels.patch(holder) == 1
    ours = holder.experts
    assert type(ours.gate_proj) is layers.QuantizedSwitchLinear and not ours.uses_fused_kernel()
    for name in PROJECTIONS:
        for array in QUANT_PROJECTION_ARRAYS:
            assert ours[name][array] is theirs[name][array]
    np.testing.assert_allclose(np.array(ours(x, indices)), np.array(expected), rtol=1e-4, atol=1e-5)
    assert mlx_moe_kernels.unpatch(holder) == 1 and holder.experts is theirs


# ======================================================== dense layers
DENSE_CLASSES = {
    nn.Linear: mlx_moe_kernels.dense.Linear,
    nn.QuantizedLinear: mlx_moe_kernels.dense.QuantizedLinear,
    nn.Embedding: mlx_moe_kernels.dense.Embedding,
    nn.QuantizedEmbedding: mlx_moe_kernels.dense.QuantizedEmbedding,
}


@pytest.mark.parametrize("case", ["float", "affine4", "mxfp4", "tied"])
def test_dense_layers_are_patched(build, case):
    """patch also computes mlx-lm's dense layers (attention, routers, the
    shared expert and its gate, the lm_head or tied embedding) on our
    kernels: same arrays, same logits; unpatch gives MLX's classes back."""
    arch = "qwen2_moe" if case == "tied" else "qwen3_moe"
    if case == "tied":
        mx.random.seed(0)
        model = qwen2_moe.Model(qwen2_moe.ModelArgs.from_dict({**QWEN2, "tie_word_embeddings": True}))
        mx.eval(model.parameters())
    else:
        model = build_model(arch)
    if case == "affine4":
        quantize(model, 32, 4, "affine")
    elif case == "mxfp4":
        quantize(model, 32, 4, "mxfp4")
    tokens = prompt(1, 9)
    before = logits(model, tokens)
    dense_before = [(m, type(m)) for _, m in model.named_modules() if type(m) in DENSE_CLASSES]
    assert dense_before and any("as_linear" in dir(m) for m, _ in dense_before)
    params_before = tree_flatten(model.parameters())
    mlx_moe_kernels.patch(model)
    for module, cls in dense_before:
        assert type(module) is DENSE_CLASSES[cls]
    assert all(a is b for (_, a), (_, b) in zip(tree_flatten(model.parameters()), params_before))
    assert_logits_close(logits(model, tokens), before, rtol=1e-4)
    mlx_moe_kernels.unpatch(model)
    assert all(type(module) is cls for module, cls in dense_before)
    np.testing.assert_array_equal(logits(model, tokens), before)


def test_dense_patch_leaves_our_own_layers():
    """unpatch only reverts the layers patch changed: a model built on our
    dense layers keeps them."""
    layer = mlx_moe_kernels.dense.Linear(8, 4)
    container = nn.Sequential(layer, nn.Linear(4, 4))
    mlx_moe_kernels.patch(container)
    assert type(container.layers[1]) is mlx_moe_kernels.dense.Linear
    mlx_moe_kernels.unpatch(container)
    assert type(container.layers[0]) is mlx_moe_kernels.dense.Linear
    assert type(container.layers[1]) is nn.Linear


def test_quantize_after_patch(build):
    """nn.quantize on a patched model quantizes our SwitchLinear layers too
    (into our QuantizedSwitchLinear); the model then gives what the
    quantized unpatched model gives."""
    reference_model, model = build_model("qwen3_moe"), build_model("qwen3_moe")
    mlx_moe_kernels.patch(model)
    nn.quantize(reference_model, group_size=32, bits=4)
    nn.quantize(model, group_size=32, bits=4)
    experts = sparse_blocks(model)[0].switch_mlp
    assert type(experts) is layers.SwitchGLU
    assert type(experts.up_proj) is layers.QuantizedSwitchLinear and experts.uses_fused_kernel()
    tokens = prompt(1, 11)
    assert_logits_close(logits(model, tokens), logits(reference_model, tokens), rtol=1e-4)


def test_fuse_combine_off(build):
    """fuse_combine=False replaces the SwitchGLU layers but keeps mlx-lm's
    block classes (and their weighted sum)."""
    model = build_model("qwen2_moe")
    tokens = prompt(1, 13)
    before = logits(model, tokens)
    assert mlx_moe_kernels.patch(model, fuse_combine=False) == MOE_LAYERS["qwen2_moe"]
    assert all(type(b) is qwen2_moe.Qwen2MoeSparseMoeBlock for b in sparse_blocks(model))
    assert_logits_close(logits(model, tokens), before, rtol=1e-4)


def test_patch_a_single_block(build):
    """A MoE block passed on its own: its SwitchGLU is replaced and its
    combine fused."""
    model = build_model("qwen3_moe")
    block = sparse_blocks(model)[0]
    x = mx.random.normal((3, 5, 64))
    expected = block(x)
    assert mlx_moe_kernels.patch(block) == 1
    assert type(block) is not qwen3_moe.Qwen3MoeSparseMoeBlock
    np.testing.assert_allclose(np.array(block(x)), np.array(expected), rtol=1e-4, atol=1e-5)
    assert mlx_moe_kernels.unpatch(block) == 1
    assert type(block) is qwen3_moe.Qwen3MoeSparseMoeBlock


def test_decode_with_kv_cache(build):
    """Prompt then token-by-token decoding through mlx-lm's KV cache."""
    reference_model, model = build_model("qwen3_moe"), build_model("qwen3_moe")
    mlx_moe_kernels.patch(model)
    caches = make_prompt_cache(reference_model), make_prompt_cache(model)
    tokens = prompt(1, 10, seed=5)
    for step in range(3):
        expected = reference_model(tokens, cache=caches[0])
        got = model(tokens, cache=caches[1])
        assert_logits_close(np.array(got), np.array(expected), rtol=1e-4)
        tokens = mx.argmax(expected[:, -1:], axis=-1)


def test_training_through_patched_model(build):
    """Gradients of a language-model loss wrt every parameter match the
    unpatched model's; frozen parameters stay frozen."""
    reference_model, model = build_model("qwen2_moe"), build_model("qwen2_moe")
    mlx_moe_kernels.patch(model)
    tokens = prompt(2, 12, seed=6)

    def loss(m, inputs):
        out = m(inputs[:, :-1])
        return nn.losses.cross_entropy(out, inputs[:, 1:]).mean()

    value, grads = nn.value_and_grad(model, loss)(model, tokens)
    ref_value, ref_grads = nn.value_and_grad(reference_model, loss)(reference_model, tokens)
    np.testing.assert_allclose(value.item(), ref_value.item(), rtol=1e-5)
    flat, ref_flat = tree_flatten(grads), tree_flatten(ref_grads)
    assert [n for n, _ in flat] == [n for n, _ in ref_flat]
    for (name, g), (_, r) in zip(flat, ref_flat):
        expected = np.array(r)
        np.testing.assert_allclose(
            np.array(g), expected, rtol=1e-3, atol=1e-3 * max(np.abs(expected).max(), 1e-6), err_msg=name
        )
    expert_grads = [n for n, _ in flat if ".switch_mlp." in n]
    assert len(expert_grads) == 3 * MOE_LAYERS["qwen2_moe"]

    frozen = build_model("qwen2_moe")
    frozen.freeze()
    mlx_moe_kernels.patch(frozen)
    assert tree_flatten(frozen.trainable_parameters()) == []


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_unpatch_keeps_updated_weights(build, quantized):
    """Weights changed after patching (training, load_weights) are what the
    restored mlx-lm layers hold (quantized: new scales and biases)."""
    model = build_model("qwen3_moe")
    if quantized:
        quantize(model, 32, 4)
    assert mlx_moe_kernels.patch(model) == MOE_LAYERS["qwen3_moe"]
    scaled = tree_map(lambda p: p * 1.5 if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters())
    model.update(scaled)
    tokens = prompt(1, 9)
    patched = logits(model, tokens)
    new_weights = tree_flatten(model.parameters())
    mlx_moe_kernels.unpatch(model)
    assert all(a is b for (_, a), (_, b) in zip(tree_flatten(model.parameters()), new_weights))
    assert_logits_close(logits(model, tokens), patched, rtol=1e-4)


@pytest.mark.parametrize(
    "dtype,rtol", [(mx.float16, 5e-3), (mx.bfloat16, 3e-2)], ids=["f16", "bf16"]
)
def test_half_precision_model(build, dtype, rtol):
    """A half-precision patched model runs on the CPU (stock mx.gather_mm
    supports only float32 there) and approximates the unpatched float32
    model holding the same (rounded) weights."""
    model = build_model("qwen3_moe")
    model.set_dtype(dtype)
    reference_model = build_model("qwen3_moe")
    reference_model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    mlx_moe_kernels.patch(model)
    tokens = prompt(1, 16)
    got = logits(model, tokens)
    assert model(tokens).dtype == dtype
    assert_logits_close(got, logits(reference_model, tokens), rtol=rtol)
