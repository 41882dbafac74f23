"""Our Qwen MoE model definitions against mlx-lm's, on tiny random
checkpoints written to disk in the Hugging Face layouts (no downloads).

* logits equal mlx-lm's model class loaded from the same checkpoint with
  mlx-lm's own ``sanitize`` (Hub layout) or with our sanitized weights
  (transformers-5 layout, which mlx-lm does not read), float32 tolerance;
* the KV cache: prefill plus one-token (and chunked) steps reproduce the
  full-sequence logits;
* the fused expert path equals the plain-MLX reference path;
* Qwen2-MoE's ``norm_topk_prob`` / dense layers against a hand-written
  forward of the sparse block; Qwen3-MoE's layer plan.
"""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_moe_kernels as mk
from mlx_moe_kernels.loading import hub_style_config, load_weights
from mlx_moe_kernels.models import qwen2_moe, qwen3_moe, qwen3_vl_moe
from mlx_moe_kernels.models.base import make_cache
from mlx_moe_kernels.models.tiny import write_tiny_checkpoint

ARCHS = ["qwen2_moe", "qwen3_moe", "qwen3_vl_moe"]
STYLES = ["hub", "transformers5"]
TOKENS = mx.array([[2, 5, 9, 3, 17, 4, 11], [7, 7, 2, 30, 1, 8, 6]], dtype=mx.uint32)


def close(a: mx.array, b: mx.array, tol: float = 2e-5) -> bool:
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return a.shape == b.shape and float(np.max(np.abs(a - b))) <= tol * max(1.0, float(np.max(np.abs(b))))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(arch, style) -> folder; Hub style sharded, transformers-5 single."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for arch in ARCHS:
        for style in STYLES:
            folder = root / f"{arch}-{style}"
            write_tiny_checkpoint(folder, arch, style=style, sharded=(style == "hub"), seed=1)
            out[arch, style] = folder
    return out


def mlx_lm_model(arch, config):
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    return module.Model(module.ModelArgs.from_dict(hub_style_config(config)))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_mlx_lm_hub_layout(checkpoints, arch):
    folder = checkpoints[arch, "hub"]
    model, config = mk.load_model(folder)
    stock = mlx_lm_model(arch, config)
    # mlx-lm reads the raw checkpoint with its own sanitize.
    stock.load_weights(list(stock.sanitize(load_weights(folder)).items()), strict=True)
    ours = model(TOKENS)
    assert ours.shape == (2, TOKENS.shape[1], config.get("vocab_size") or config["text_config"]["vocab_size"])
    assert close(ours, stock(TOKENS))


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers5_style_equals_hub_style(checkpoints, arch):
    hub, _ = mk.load_model(checkpoints[arch, "hub"])
    new, config = mk.load_model(checkpoints[arch, "transformers5"])
    assert "rope_parameters" in (config.get("text_config") or config)
    assert close(new(TOKENS), hub(TOKENS), tol=1e-6)
    stock = mlx_lm_model(arch, config)
    stock.load_weights(tree_flatten(new.parameters()), strict=True)
    assert close(new(TOKENS), stock(TOKENS))


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_matches_full_sequence(checkpoints, arch):
    model, _ = mk.load_model(checkpoints[arch, "hub"])
    full = model(TOKENS)
    cache = make_cache(model)
    parts = [model(TOKENS[:, :3], cache=cache)]  # prefill
    parts.append(model(TOKENS[:, 3:4], cache=cache))  # one token
    parts.append(model(TOKENS[:, 4:6], cache=cache))  # a chunk after the cache
    parts.append(model(TOKENS[:, 6:], cache=cache))
    assert cache[0].offset == TOKENS.shape[1]
    assert close(mx.concatenate(parts, axis=1), full)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_equals_reference_path(checkpoints, arch):
    model, _ = mk.load_model(checkpoints[arch, "hub"])
    fused = model(TOKENS)
    model.set_fused(False)
    assert close(model(TOKENS), fused)


def test_vl_model_is_text_only_and_drops_vision(checkpoints):
    model, _ = mk.load_model(checkpoints["qwen3_vl_moe", "hub"])
    assert isinstance(model, qwen3_vl_moe.Qwen3VLMoeTextModel)
    assert "text-only" in qwen3_vl_moe.__doc__ and "vision" in qwen3_vl_moe.Model.__doc__
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not any("visual" in k for k in names)
    assert all(k.startswith("language_model.") for k in names)
    assert "language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight" in names


def test_qwen3_layer_plan(checkpoints):
    model, config = mk.load_model(checkpoints["qwen3_moe", "hub"])
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert config["mlp_only_layers"] == [1]
    assert kinds == ["Qwen3MoeSparseMoeBlock", "MLP", "Qwen3MoeSparseMoeBlock"]
    assert "lm_head" not in model  # tied embeddings
    args = qwen3_moe.ModelArgs.from_dict(dict(config, decoder_sparse_step=2, mlp_only_layers=[]))
    assert [args.is_sparse(i) for i in range(4)] == [False, True, False, True]


def _hand_qwen2_block(block, x, norm_topk_prob):
    """A plain NumPy forward of the Qwen2-MoE sparse block."""
    x = np.array(x, dtype=np.float64)
    gate = np.array(block.gate.weight, dtype=np.float64)
    logits = x @ gate.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    g = np.array(block.switch_mlp.gate_proj.weight, dtype=np.float64)
    u = np.array(block.switch_mlp.up_proj.weight, dtype=np.float64)
    d = np.array(block.switch_mlp.down_proj.weight, dtype=np.float64)
    silu = lambda v: v / (1 + np.exp(-v))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t])[: block.top_k]
        w = probs[t, top] / (probs[t, top].sum() if norm_topk_prob else 1.0)
        for e, s in zip(top, w):
            out[t] += s * (d[e] @ (silu(g[e] @ x[t]) * (u[e] @ x[t])))
    se = block.shared_expert
    sg, su, sd = (np.array(p.weight, dtype=np.float64) for p in (se.gate_proj, se.up_proj, se.down_proj))
    shared = (silu(x @ sg.T) * (x @ su.T)) @ sd.T
    gate_s = 1 / (1 + np.exp(-(x @ np.array(block.shared_expert_gate.weight, dtype=np.float64).T)))
    return out + gate_s * shared


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen2_sparse_block_against_hand_forward(norm_topk_prob):
    mx.random.seed(3)
    args = qwen2_moe.ModelArgs(
        model_type="qwen2_moe", hidden_size=16, num_hidden_layers=1, intermediate_size=20,
        num_attention_heads=2, num_experts_per_tok=2, num_experts=4, moe_intermediate_size=8,
        shared_expert_intermediate_size=12, rms_norm_eps=1e-6, vocab_size=10,
        norm_topk_prob=norm_topk_prob,
    )
    block = qwen2_moe.Qwen2MoeSparseMoeBlock(args)
    x = mx.random.normal((5, 16))
    expected = _hand_qwen2_block(block, x, norm_topk_prob)
    assert np.allclose(np.array(block(x)), expected, atol=1e-5, rtol=1e-4)


def test_every_public_class_and_function_has_a_docstring():
    import inspect

    from mlx_moe_kernels import generate, loading
    from mlx_moe_kernels.models import base, tiny

    for module in (base, qwen2_moe, qwen3_moe, qwen3_vl_moe, loading, generate, tiny):
        assert module.__doc__
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert obj.__doc__, f"{module.__name__}.{name} has no docstring"
