"""Tests of the whole-model benchmark (``mlx-moe bench --mode model``,
:mod:`mlx_moe_kernels.bench.model`).

They run it on tiny Qwen3-MoE and Qwen2-MoE configs (2 layers, hidden 64,
4 experts, vocabulary 256) in every format and check the report's structure
and what it derives from the model: the bytes of every part of a decode
step, computed here from the config, the formats' quantization, the JSON
and the table. Never wall-clock values: on a shared 2-core machine a part
timed alone may even take longer than a whole step.
"""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_moe_kernels import bench, cli
from mlx_moe_kernels.bench import model as model_bench
from mlx_moe_kernels.layers import QuantizedSwitchLinear
from mlx_moe_kernels.loading import build_model, load_model, quantize_model
from mlx_moe_kernels.models.tiny import write_tiny_checkpoint

D, HEADS, HEAD_DIM, E, K, H, VOCAB, LAYERS = 64, 2, 32, 4, 2, 64, 256, 2

TINY_QWEN3 = dict(
    model_type="qwen3_moe", hidden_size=D, num_hidden_layers=LAYERS, intermediate_size=128,
    num_attention_heads=HEADS, num_key_value_heads=1, head_dim=HEAD_DIM, num_experts=E,
    num_experts_per_tok=K, moe_intermediate_size=H, norm_topk_prob=True, rms_norm_eps=1e-6,
    vocab_size=VOCAB, tie_word_embeddings=False,
)
TINY_QWEN2 = dict(
    model_type="qwen2_moe", hidden_size=D, num_hidden_layers=LAYERS, intermediate_size=128,
    num_attention_heads=HEADS, num_key_value_heads=HEADS, num_experts=E, num_experts_per_tok=K,
    moe_intermediate_size=H, shared_expert_intermediate_size=128, norm_topk_prob=False,
    rms_norm_eps=1e-6, vocab_size=VOCAB, tie_word_embeddings=False,
)
SMALL = dict(prompt_tokens=8, decode_tokens=4, repeats=2, part_repeats=2, read_probe_bytes=1 << 20,
             evict_bytes=1 << 20, progress=False, device=mx.cpu)
BITS = {"bf16": None, "q8": 8, "q4": 4}


def linear_bytes(out_dims: int, in_dims: int, bits) -> int:
    """A bias-free [out, in] weight: bfloat16, or affine codes plus one
    bfloat16 scale and bias per group of 64."""
    if bits is None:
        return out_dims * in_dims * 2
    return out_dims * in_dims * bits // 8 + out_dims * (in_dims // 64) * 2 * 2


def expected_part_bytes(config, fmt: str, context: int) -> dict:
    """Bytes of each part of a decode step, from the config."""
    bits = BITS[fmt]
    kv_heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim", D // HEADS)
    q_out, kv_out = HEADS * head_dim, kv_heads * head_dim
    qwen3 = config["model_type"] == "qwen3_moe"
    biases = 0 if qwen3 else (q_out + 2 * kv_out) * 2  # Qwen2's q/k/v biases, bfloat16
    attn_proj = (linear_bytes(q_out, D, bits) + 2 * linear_bytes(kv_out, D, bits)
                 + linear_bytes(D, q_out, bits) + biases)
    norms = 2 * D * 2 + (2 * head_dim * 2 if qwen3 else 0)
    kv_per_position = 2 * kv_out * 2
    router_bits = (8 if qwen3 else bits) if bits else None  # Qwen3-MoE: 8-bit routers
    expert = 2 * linear_bytes(H, D, bits) + linear_bytes(D, H, bits)
    parts = {
        "attn_proj": LAYERS * attn_proj,
        "attention": LAYERS * (norms + (context + 1) * kv_per_position),
        "experts": LAYERS * K * expert,  # k of the E experts
        "router": LAYERS * linear_bytes(E, D, router_bits),
        "lm_head": D * 2 + linear_bytes(VOCAB, D, bits),
    }
    if not qwen3:
        shared = config["shared_expert_intermediate_size"]
        parts["shared_expert"] = LAYERS * (
            2 * linear_bytes(shared, D, bits) + linear_bytes(D, shared, bits) + linear_bytes(1, D, bits)
        )
    return parts


@pytest.fixture(scope="module")
def qwen3_report():
    return bench.run_model_bench(TINY_QWEN3, layers=LAYERS, **SMALL)


def test_model_bench_report_structure(qwen3_report):
    report = qwen3_report
    assert [r.format for r in report.formats] == ["bf16", "q8", "q4"]
    assert report.config["num_hidden_layers"] == LAYERS and report.checkpoint is None
    for result in report.formats:
        assert result.bits == BITS[result.format]
        assert result.group_size == (64 if result.bits else None)
        assert len(result.prefill_samples_s) == SMALL["repeats"]
        assert len(result.decode_runs_s) == SMALL["repeats"]
        assert all(len(run) == SMALL["decode_tokens"] for run in result.decode_runs_s)
        assert min(result.prefill_samples_s) > 0 and min(min(run) for run in result.decode_runs_s) > 0
        assert [p.name for p in result.parts] == ["attn_proj", "attention", "experts", "router", "lm_head"]
        for part in result.parts:
            assert len(part.samples_s) == SMALL["part_repeats"] and min(part.samples_s) > 0
            assert part.gb_per_s == pytest.approx(part.bytes_read / part.median_s / 1e9)
        # The rest is the step minus the parts (it may be negative: timing noise).
        assert result.rest_s == pytest.approx(result.step_s - sum(p.median_s for p in result.parts))
        assert result.prefill_tokens_per_s == pytest.approx(
            SMALL["prompt_tokens"] / np.median(result.prefill_samples_s))
        assert result.decode_tokens_per_s == pytest.approx(
            SMALL["decode_tokens"] / np.median([sum(run) for run in result.decode_runs_s]))
        assert result.read_gb_per_s > 0
        assert result.bandwidth_share == pytest.approx(result.step_gb_per_s / result.read_gb_per_s)


@pytest.mark.parametrize("fmt", ["bf16", "q8", "q4"])
def test_model_bench_bytes_from_first_principles(qwen3_report, fmt):
    result = next(r for r in qwen3_report.formats if r.format == fmt)
    context = SMALL["decode_tokens"] // 2
    assert result.context_positions == context
    expected = expected_part_bytes(TINY_QWEN3, fmt, context)
    assert {p.name: p.bytes_read for p in result.parts} == pytest.approx(expected)
    embedding_row = linear_bytes(VOCAB, D, BITS[fmt]) / VOCAB
    assert result.rest_bytes == pytest.approx(embedding_row)
    assert result.step_bytes == pytest.approx(sum(expected.values()) + embedding_row)
    if fmt == "bf16":  # every parameter once: embedding, head, final norm, layers
        experts = E * (2 * linear_bytes(H, D, None) + linear_bytes(D, H, None))
        norms = 2 * D * 2 + 2 * HEAD_DIM * 2
        per_layer = (expected["attn_proj"] + expected["router"]) / LAYERS + experts + norms
        assert result.weight_bytes == 2 * linear_bytes(VOCAB, D, None) + D * 2 + LAYERS * per_layer


def test_model_bench_json_and_table(qwen3_report, tmp_path):
    path = tmp_path / "model.json"
    qwen3_report.write_json(str(path))
    data = json.loads(path.read_text())
    assert data["mode"] == "model" and data["model"] == "qwen3_moe"
    assert [f["format"] for f in data["formats"]] == ["bf16", "q8", "q4"]
    for entry, result in zip(data["formats"], qwen3_report.formats):
        names = [p["name"] for p in entry["step"]["parts"]]
        assert names == ["attn_proj", "attention", "experts", "router", "lm_head", "rest"]
        assert entry["step"]["bytes"] == pytest.approx(sum(p["bytes"] for p in entry["step"]["parts"]))
        assert entry["decode"]["median_step_ms"] == pytest.approx(result.step_s * 1e3)
        assert entry["bits"] == result.bits
    table = qwen3_report.format_table()
    for fmt in ("bf16", "q8", "q4"):
        assert re.search(rf"^{fmt} +decode step ", table, re.M)
        assert f"{fmt}: " in table and "tok/s" in table and "read probe" in table


def test_model_bench_qwen2_shared_expert_and_biases():
    report = bench.run_model_bench(TINY_QWEN2, layers=LAYERS, formats=["bf16", "q4"], **SMALL)
    for result in report.formats:
        names = [p.name for p in result.parts]
        assert names == ["attn_proj", "attention", "experts", "router", "shared_expert", "lm_head"]
        expected = expected_part_bytes(TINY_QWEN2, result.format, result.context_positions)
        assert {p.name: p.bytes_read for p in result.parts} == pytest.approx(expected)


def test_random_model_weights_and_quantization():
    config = model_bench.model_config(TINY_QWEN3, layers=LAYERS)
    first = model_bench.build_random_model(config, "bf16", seed=3)
    again = model_bench.build_random_model(config, "bf16", seed=3)
    layer = first.model.layers[0]
    assert layer.input_layernorm.weight.dtype == mx.bfloat16
    for norm in (layer.input_layernorm, layer.self_attn.q_norm):
        assert mx.all(norm.weight == 1).item()
    w = layer.mlp.switch_mlp.gate_proj.weight
    magnitude = np.abs(np.array(w.astype(mx.float32)))
    assert w.dtype == mx.bfloat16 and magnitude.min() >= 2**-6 and magnitude.max() < 2**-5
    assert mx.array_equal(w, again.model.layers[0].mlp.switch_mlp.gate_proj.weight).item()

    q4 = model_bench.build_random_model(config, "q4", seed=3)
    block = q4.model.layers[1].mlp
    assert isinstance(block.switch_mlp.gate_proj, QuantizedSwitchLinear)
    assert block.switch_mlp.gate_proj.bits == 4
    assert block.gate.bits == 8  # Qwen3-MoE keeps its routers at 8 bits
    assert q4.lm_head.bits == 4 and q4.model.embed_tokens.bits == 4
    assert q4.model.layers[0].self_attn.q_proj.bits == 4


@pytest.mark.parametrize("name", list(model_bench.MODEL_CONFIGS))
def test_builtin_configs_build_the_real_shapes(name):
    config = model_bench.model_config(name, layers=1)
    real = model_bench.MODEL_CONFIGS[name]
    assert config["num_hidden_layers"] == 1 and real["num_hidden_layers"] in (24, 48)
    model = build_model(config)  # lazily initialised: nothing is evaluated
    switch = model.model.layers[0].mlp.switch_mlp
    assert switch.gate_proj.weight.shape == (real["num_experts"], real["moe_intermediate_size"], 2048)
    assert switch.down_proj.weight.shape == (real["num_experts"], 2048, real["moe_intermediate_size"])
    assert model.lm_head.weight.shape == (151936, 2048)
    attn = model.model.layers[0].self_attn
    head_dim = real.get("head_dim", 2048 // real["num_attention_heads"])
    assert attn.q_proj.weight.shape == (real["num_attention_heads"] * head_dim, 2048)
    assert attn.k_proj.weight.shape == (real["num_key_value_heads"] * head_dim, 2048)
    assert ("bias" in attn.q_proj) == (name == "qwen1.5-moe-a2.7b")
    assert ("q_norm" in attn) == (name == "qwen3-30b-a3b")


CHECKPOINT_OVERRIDES = dict(hidden_size=64, head_dim=16, moe_intermediate_size=64, intermediate_size=64)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_vl_moe"])
def test_model_bench_checkpoint(tmp_path, model_type):
    """A checkpoint folder, float, measured in bfloat16 and 4 bits. The tiny
    Qwen3-MoE has a dense layer and tied embeddings; Qwen3-VL-MoE nests its
    language model."""
    config = write_tiny_checkpoint(tmp_path, model_type, overrides=CHECKPOINT_OVERRIDES)
    text = config.get("text_config", config)
    report = bench.run_model_bench(checkpoint=str(tmp_path), layers=None, formats=["bf16", "q4"], **SMALL)
    assert [r.format for r in report.formats] == ["bf16", "q4"] and report.checkpoint == str(tmp_path)
    vocab = text["vocab_size"]
    for result in report.formats:
        bits = BITS[result.format]
        parts = {p.name: p.bytes_read for p in result.parts}
        dense = bool(text["mlp_only_layers"])
        assert ("dense_mlp" in parts) == dense
        # The head reads a [vocab, 64] matrix (Qwen3-MoE's: the tied embedding).
        assert parts["lm_head"] == 64 * 2 + linear_bytes(vocab, 64, bits)
        moe_layers = text["num_hidden_layers"] - len(text["mlp_only_layers"])
        expert = 2 * linear_bytes(64, 64, bits) + linear_bytes(64, 64, bits)
        assert parts["experts"] == pytest.approx(moe_layers * text["num_experts_per_tok"] * expert)
        assert result.rest_bytes == pytest.approx(linear_bytes(vocab, 64, bits) / vocab)


def test_model_bench_quantized_checkpoint_runs_as_stored(tmp_path):
    float_dir, quantized_dir = tmp_path / "float", tmp_path / "q4"
    write_tiny_checkpoint(float_dir, "qwen3_moe", overrides=CHECKPOINT_OVERRIDES)
    model, config = load_model(float_dir)
    config = quantize_model(model, config, bits=4, group_size=64)
    quantized_dir.mkdir()
    (quantized_dir / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(quantized_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    report = bench.run_model_bench(checkpoint=str(quantized_dir), layers=None, **SMALL)
    assert [r.format for r in report.formats] == ["stored"] and report.formats[0].bits is None
    with pytest.raises(ValueError, match="as stored"):
        bench.plan_model_bench(checkpoint=str(quantized_dir), layers=None, formats=["q8"])


def test_plan_model_bench_errors(tmp_path):
    for bad in (dict(model="nope"), dict(formats=["q3"]), dict(formats=[]), dict(layers=0),
                dict(prompt_tokens=0), dict(checkpoint=str(tmp_path), layers=2)):
        with pytest.raises((ValueError, FileNotFoundError)):
            bench.plan_model_bench(**bad)


@pytest.fixture
def tiny_cli_model(monkeypatch):
    monkeypatch.setitem(model_bench.MODEL_CONFIGS, "tiny-qwen3", TINY_QWEN3)
    monkeypatch.setattr(bench.timing, "READ_PROBE_BYTES", 1 << 20)
    monkeypatch.setattr(bench.timing, "EVICT_BYTES", 1 << 20)
    return "tiny-qwen3"


def test_cli_bench_model_mode(tiny_cli_model, tmp_path, capsys):
    out = tmp_path / "model.json"
    status = cli.main(["bench", "--mode", "model", "--model", tiny_cli_model, "--layers", "1",
                       "--format", "bf16,q4", "--prompt-tokens", "8", "--decode-tokens", "2",
                       "--repeats", "1", "--device", "cpu", "--no-progress", "--json", str(out)])
    text = capsys.readouterr().out
    assert status == cli.EXIT_OK, text
    assert "mlx-moe bench --mode model: tiny-qwen3 (1 layer, random weights)" in text
    assert re.search(r"^bf16 +decode step ", text, re.M) and re.search(r"^q4 +decode step ", text, re.M)
    data = json.loads(out.read_text())
    assert [f["format"] for f in data["formats"]] == ["bf16", "q4"]
    assert data["config"]["num_hidden_layers"] == 1


@pytest.mark.parametrize(
    "options",
    [["--mode", "model", "--tokens", "1"], ["--mode", "model", "--bits", "4"],
     ["--mode", "model", "--format", "q3"], ["--mode", "model", "--model", "a,b"],
     ["--layers", "2"], ["--mode", "switch_glu", "--format", "q4"]],
)
def test_cli_bench_model_mode_usage_errors(tiny_cli_model, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--no-progress", *options])
    assert exit_info.value.code == cli.EXIT_USAGE
