"""``load_model`` on tiny checkpoint folders: both config styles, single
file and sharded, dtype casting, and every failure named (missing or extra
key, wrong shape, unreadable or missing file, ambiguous fused layout)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
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
