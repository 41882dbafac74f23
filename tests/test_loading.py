"""``load_model`` on tiny checkpoint folders: both config styles, single
file and sharded, dtype casting, and every failure named (missing or extra
key, wrong shape, unreadable or missing file, ambiguous fused layout)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mlx_moe_kernels as mk
from mlx_moe_kernels.loading import load_weights
from mlx_moe_kernels.models import qwen2_moe, qwen3_moe, qwen3_vl_moe
from mlx_moe_kernels.models.tiny import write_tiny_checkpoint

TOKENS = mx.array([[2, 5, 9, 3]], dtype=mx.uint32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    write_tiny_checkpoint(root / "q2", "qwen2_moe")
    write_tiny_checkpoint(root / "q3", "qwen3_moe", sharded=True)
    write_tiny_checkpoint(root / "vl", "qwen3_vl_moe")
    return {"qwen2_single": root / "q2", "qwen3_sharded": root / "q3", "vl_single": root / "vl"}


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _rewrite_single(folder, edit):
    """Apply ``edit`` to the weights dict of a single-file checkpoint."""
    weights = dict(mx.load(str(folder / "model.safetensors")))
    edit(weights)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)


@pytest.mark.parametrize(
    "key, arch", [("qwen2_single", qwen2_moe), ("qwen3_sharded", qwen3_moe), ("vl_single", qwen3_vl_moe)]
)
def test_loads_every_parameter(folders, key, arch):
    model, config = mk.load_model(folders[key])
    assert isinstance(model, arch.Model)
    assert config["model_type"] == arch.__name__.rsplit(".", 1)[1]
    params = dict(tree_flatten(model.parameters()))
    raw = load_weights(folders[key])
    sanitized = model.sanitize(raw)
    assert set(sanitized) == set(params)
    for name, value in sanitized.items():
        assert mx.array_equal(params[name], value), name


def test_dtype_casts_floating_weights(folders):
    model, _ = mk.load_model(folders["qwen3_sharded"], dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}
    assert model(TOKENS).shape == (1, 4, 32)
    model16, _ = mk.load_model(folders["qwen2_single"], dtype=mx.float16)
    assert {v.dtype for _, v in tree_flatten(model16.parameters())} == {mx.float16}
    with pytest.raises(ValueError, match="dtype"):
        mk.load_model(folders["qwen2_single"], dtype="int8")


def test_missing_key_is_named(folders, tmp_path):
    folder = _copy(folders["qwen2_single"], tmp_path)
    _rewrite_single(folder, lambda w: w.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing weight 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        mk.load_model(folder)


def test_missing_expert_is_named(folders, tmp_path):
    folder = _copy(folders["qwen2_single"], tmp_path)
    _rewrite_single(folder, lambda w: w.pop("model.layers.0.mlp.experts.2.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.2\.up_proj\.weight"):
        mk.load_model(folder)


def test_extra_key_is_named(folders, tmp_path):
    folder = _copy(folders["qwen2_single"], tmp_path)
    _rewrite_single(folder, lambda w: w.update({"model.layers.0.extra.weight": mx.zeros((2,))}))
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.layers\.0\.extra\.weight'"):
        mk.load_model(folder)


def test_wrong_shape_is_named(folders, tmp_path):
    folder = _copy(folders["qwen2_single"], tmp_path)
    _rewrite_single(folder, lambda w: w.update({"model.norm.weight": mx.ones((31,))}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(31,\)"):
        mk.load_model(folder)


def test_unreadable_file_is_named(folders, tmp_path):
    folder = _copy(folders["qwen2_single"], tmp_path)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        mk.load_model(folder)


def test_missing_shard_is_named(folders, tmp_path):
    folder = _copy(folders["qwen3_sharded"], tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        mk.load_model(folder)


def test_index_naming_absent_tensor(folders, tmp_path):
    folder = _copy(folders["qwen3_sharded"], tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.ghost\.weight"):
        mk.load_model(folder)


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError):
        mk.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        mk.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llama"):
        mk.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json"):
        mk.load_model(tmp_path)


def test_no_weights_file(folders, tmp_path):
    folder = _copy(folders["qwen2_single"], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        mk.load_model(folder)


def test_ambiguous_gate_up_layout_is_named(tmp_path):
    # hidden_size 32 == 2 * moe_intermediate_size 16.
    folder = tmp_path / "amb"
    write_tiny_checkpoint(folder, "qwen3_vl_moe", overrides={"moe_intermediate_size": 16})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj.*hidden_size \(32\)"):
        mk.load_model(folder)


def test_gate_up_shape_that_fits_no_layout_is_named(folders, tmp_path):
    folder = _copy(folders["vl_single"], tmp_path)
    key = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    _rewrite_single(folder, lambda w: w.update({key: mx.zeros((4, 32, 20))}))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj.*\(4, 32, 20\)"):
        mk.load_model(folder)


def test_vl_sanitize_prefixes_and_layouts():
    args = qwen3_vl_moe.ModelArgs(
        model_type="qwen3_vl_moe",
        text_config=dict(
            hidden_size=8, num_hidden_layers=1, intermediate_size=12, num_attention_heads=2,
            num_experts=3, num_experts_per_tok=2, moe_intermediate_size=5, rms_norm_eps=1e-6,
            vocab_size=10, head_dim=4,
        ),
    )
    model = qwen3_vl_moe.Model(args)
    gate_up_hub = mx.random.normal((3, 8, 10))  # [E, hidden, 2*inter]
    down_hub = mx.random.normal((3, 5, 8))  # [E, inter, hidden]
    for layout, (gate_up, down) in {
        "hub": (gate_up_hub, down_hub),
        "transformers5": (gate_up_hub.swapaxes(1, 2), down_hub.swapaxes(1, 2)),
    }.items():
        for prefix in ("model.language_model.", "language_model.model."):
            out = model.sanitize({
                f"{prefix}layers.0.mlp.experts.gate_up_proj": gate_up,
                f"{prefix}layers.0.mlp.experts.down_proj": down,
                "model.visual.blocks.0.attn.qkv.weight": mx.zeros((3, 3)),
                "visual.merger.weight": mx.zeros((3, 3)),
                "lm_head.weight": mx.zeros((10, 8)),
            })
            base = "language_model.model.layers.0.mlp.switch_mlp"
            assert sorted(out) == sorted(
                [f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight",
                 "language_model.lm_head.weight"]
            ), layout
            assert mx.array_equal(out[f"{base}.gate_proj.weight"], gate_up_hub[..., :5].swapaxes(1, 2))
            assert mx.array_equal(out[f"{base}.up_proj.weight"], gate_up_hub[..., 5:].swapaxes(1, 2))
            assert mx.array_equal(out[f"{base}.down_proj.weight"], down_hub.swapaxes(1, 2))


# ------------------------------------------------------- quantized folders
WIDE = dict(hidden_size=64, moe_intermediate_size=64, intermediate_size=64)  # every layer quantizable at group 64


def _wide_overrides(arch):
    return dict(WIDE, shared_expert_intermediate_size=64) if arch == "qwen2_moe" else WIDE


def _save(model, config, folder):
    """Write ``model``'s parameters and ``config`` as a checkpoint folder."""
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def quantized_folder(tmp_path_factory):
    """(float folder, 4-bit folder written by quantize_model) of a tiny Qwen3-MoE."""
    root = tmp_path_factory.mktemp("quant")
    write_tiny_checkpoint(root / "float", "qwen3_moe", overrides=WIDE, seed=4)
    model, config = mk.load_model(root / "float")
    config = mk.quantize_model(model, config, group_size=64, bits=4)
    return root / "float", _save(model, config, root / "q4")


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "qwen3_vl_moe"])
def test_quantized_round_trip(tmp_path, arch):
    """quantize_model, save, load_model: the same logits, the same layers."""
    write_tiny_checkpoint(tmp_path / "float", arch, overrides=_wide_overrides(arch), seed=5)
    model, config = mk.load_model(tmp_path / "float")
    config = mk.quantize_model(model, config, bits=4)
    assert config["quantization_config"] == config["quantization"]
    expected = model(TOKENS)
    loaded, loaded_config = mk.load_model(_save(model, config, tmp_path / "q"))
    assert loaded_config["quantization"] == config["quantization"]
    assert [type(m) for _, m in loaded.named_modules()] == [type(m) for _, m in model.named_modules()]
    assert mx.array_equal(loaded(TOKENS), expected)
    assert loaded.layers[0].mlp.switch_mlp.uses_fused_kernel()


def test_only_layers_with_scales_are_quantized(tmp_path):
    """nn.quantize of the experts only, a config without overrides: the
    loader quantizes exactly the layers whose scales the checkpoint holds."""
    write_tiny_checkpoint(tmp_path / "float", "qwen3_moe", overrides=WIDE, seed=6)
    model, config = mk.load_model(tmp_path / "float")
    nn.quantize(model, 64, 8, class_predicate=lambda _, m: isinstance(m, mk.SwitchLinear))
    config["quantization"] = {"group_size": 64, "bits": 8}
    loaded, _ = mk.load_model(_save(model, config, tmp_path / "q"))
    assert type(loaded.layers[0].mlp.switch_mlp.up_proj) is mk.QuantizedSwitchLinear
    assert type(loaded.layers[0].mlp.gate) is mk.dense.Linear
    assert mx.array_equal(loaded(TOKENS), model(TOKENS))


def test_dtype_keeps_packed_weights(quantized_folder):
    model, _ = mk.load_model(quantized_folder[1], dtype="bfloat16")
    up = model.layers[0].mlp.switch_mlp.up_proj
    assert (up.weight.dtype, up.scales.dtype, up.biases.dtype) == (mx.uint32, mx.bfloat16, mx.bfloat16)
    assert model(TOKENS).dtype == mx.bfloat16


@pytest.mark.parametrize(
    "arch, mode", [("qwen3_moe", "affine"), ("qwen3_moe", "mxfp4"), ("qwen2_moe", "affine"), ("qwen3_vl_moe", "affine")]
)
def test_mlx_lm_converted_checkpoint(tmp_path, arch, mode):
    """A folder written by mlx-lm's own convert (quantized) loads into our
    model and gives mlx-lm's logits."""
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.utils import load_model as mlx_lm_load_model

    write_tiny_checkpoint(tmp_path / "hf", arch, overrides=_wide_overrides(arch), seed=7)
    bits, group_size = (4, 64) if mode == "affine" else (4, 32)
    mlx_lm.convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), quantize=True, q_bits=bits, q_group_size=group_size, q_mode=mode)
    ours, config = mk.load_model(tmp_path / "mlx")
    theirs, _ = mlx_lm_load_model(tmp_path / "mlx")
    experts = ours.layers[0].mlp.switch_mlp
    assert experts.uses_fused_kernel() and experts.up_proj.quantization == (group_size, bits, mode)
    expected = theirs(TOKENS)
    got = ours(TOKENS)
    assert got.shape == expected.shape
    assert mx.abs(got - expected).max().item() <= 1e-4 * max(1.0, mx.abs(expected).max().item())


@pytest.mark.parametrize(
    "section, message",
    [
        ({"group_size": 64, "bits": "four"}, r"quantization\['bits'\] must be an integer"),
        ({"group_size": 0, "bits": 4}, r"quantization\['group_size'\] must be a positive integer"),
        ({"group_size": 64}, r"quantization has no 'bits'"),
        ({"group_size": 64, "bits": 4, "mode": "int4"}, r"quantization\['mode'\] must be one of"),
        ({"group_size": 64, "bits": 4, "model.layers.0.mlp.gate": 8}, r"quantization\['model\.layers\.0\.mlp\.gate'\] must be a dict"),
        ({"group_size": 64, "bits": 4, "model.layers.0.mlp.gate": {"bits": 8, "bias": 1}}, r"\['model\.layers\.0\.mlp\.gate'\] has unsupported setting 'bias'"),
        ({"group_size": 64, "bits": 4, "model.layers.0.mlp.gate": {"bits": 9}}, r"\['model\.layers\.0\.mlp\.gate'\]\['bits'\]"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, r"quantization describes a 'gptq' checkpoint"),
        ("4bit", r"quantization must be an object"),
        ({"group_size": 64, "bits": 4, "model.norm": {"bits": 4}}, r"quantization\['model\.norm'\]: a RMSNorm cannot be quantized"),
        ({"group_size": 64, "bits": 4, "model.layers.0.mlp.gate": {"group_size": 128}}, r"cannot quantize 'model\.layers\.0\.mlp\.gate'"),
        ({"group_size": 64, "bits": 8}, r"has shape .* \(quantized: group_size 64, bits 8, mode affine\)"),
    ],
)
def test_malformed_quantization_is_named(quantized_folder, tmp_path, section, message):
    folder = _copy(quantized_folder[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    config["quantization"] = section
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        mk.load_model(folder)


def test_quantization_config_and_text_config_sections(quantized_folder, tmp_path):
    folder = _copy(quantized_folder[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    section = config.pop("quantization")
    (folder / "config.json").write_text(json.dumps(config))  # quantization_config only
    model, _ = mk.load_model(folder)
    assert type(model.layers[0].mlp.gate) is mk.dense.QuantizedLinear and model.layers[0].mlp.gate.bits == 8
    config.pop("quantization_config")
    config["text_config"] = {"quantization": section}
    (folder / "config.json").write_text(json.dumps(config))
    assert mk.load_model(folder)[0].layers[0].mlp.gate.bits == 8


def test_quantized_weights_without_section_are_named(quantized_folder, tmp_path):
    folder = _copy(quantized_folder[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization"], config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected weight '.*\.(scales|biases)'.*no 'quantization' section"):
        mk.load_model(folder)


def test_missing_scales_are_named(quantized_folder, tmp_path):
    folder = _copy(quantized_folder[1], tmp_path)
    key = "model.layers.2.mlp.switch_mlp.down_proj"
    _rewrite_single(folder, lambda w: (w.pop(f"{key}.scales"), w.pop(f"{key}.biases")))
    with pytest.raises(ValueError, match=rf"'{key}\.weight' is packed \(uint32\) but the checkpoint has no '{key}\.scales'"):
        mk.load_model(folder)
    folder = _copy(quantized_folder[1], tmp_path / "b")
    _rewrite_single(folder, lambda w: w.pop(f"{key}.biases"))
    with pytest.raises(ValueError, match=rf"missing weight '{key}\.biases'.*bits 4"):
        mk.load_model(folder)
