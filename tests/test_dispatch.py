"""The dispatch table (``mlx_moe_kernels.dispatch``): environment overrides,
shape classes, decisions timed once and cached on disk, reloaded without
timing, and the ``SwitchGLU`` layer obeying the choice. A GPU decision is
exercised with stand-in implementations of known cost (no GPU here)."""

from __future__ import annotations

import json
import time

import mlx.core as mx
import numpy as np
import pytest

import mlx_moe_kernels as mk
from mlx_moe_kernels import dispatch, layers, reference


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(dispatch.ENV_MODE, raising=False)
    monkeypatch.setattr(dispatch, "_TABLE", None)
    return tmp_path


def slow(ms):
    def run():
        time.sleep(ms / 1e3)
        return mx.zeros((1,))
    return run


def never():
    raise AssertionError("timed although the decision was known")


def test_mode_and_shape_class(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_MODE, raising=False)
    assert dispatch.mode() == "auto"
    for value in ("ours", "stock", "auto", " Stock "):
        monkeypatch.setenv(dispatch.ENV_MODE, value)
        assert dispatch.mode() == value.strip().lower()
    monkeypatch.setenv(dispatch.ENV_MODE, "fastest")
    with pytest.raises(ValueError, match=dispatch.ENV_MODE):
        dispatch.mode()
    assert [dispatch.shape_class(r) for r in (1, 8, 9, 64, 65, 4096)] == [
        "decode", "decode", "small", "small", "large", "large"]


def test_cpu_auto_is_ours_without_timing(cache):
    table = dispatch.DispatchTable()
    assert table.choose("switch_glu", "bfloat16", 1, mx.cpu, never, never) == "ours"
    assert not (cache / "dispatch.json").exists()


def test_gpu_decision_is_timed_once_cached_and_reloaded(cache):
    gpu = mx.Device(mx.gpu)
    table = dispatch.DispatchTable()
    assert table.choose("switch_glu", "bfloat16", 1, gpu, slow(20), slow(1)) == "stock"
    assert table.choose("switch_glu", "bfloat16", 4, gpu, never, never) == "stock"  # same class
    assert table.choose("switch_glu", "bfloat16", 512, gpu, slow(1), slow(20)) == "ours"  # another class
    saved = json.loads((cache / "dispatch.json").read_text())
    assert sorted(v["choice"] for v in saved.values()) == ["ours", "stock"]
    assert all(k.split("|")[3:] in (["switch_glu", "bfloat16", "decode"], ["switch_glu", "bfloat16", "large"])
               for k in saved)
    again = dispatch.DispatchTable()
    assert again.choose("switch_glu", "bfloat16", 2, gpu, never, never) == "stock"
    assert again.choose("switch_glu", "bfloat16", 300, gpu, never, never) == "ours"


def test_environment_overrides_the_table(cache, monkeypatch):
    gpu = mx.Device(mx.gpu)
    dispatch.DispatchTable().choose("switch_glu", "bfloat16", 1, gpu, slow(20), slow(1))
    monkeypatch.setenv(dispatch.ENV_MODE, "ours")
    assert dispatch.DispatchTable().choose("switch_glu", "bfloat16", 1, gpu, never, never) == "ours"
    monkeypatch.setenv(dispatch.ENV_MODE, "stock")
    assert dispatch.DispatchTable().choose("switch_glu", "bfloat16", 1, mx.cpu, never, never) == "stock"


def test_unreadable_cache_warns_and_starts_empty(cache):
    (cache / "dispatch.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable dispatch cache"):
        table = dispatch.DispatchTable()
    assert table.decisions == {}


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "q4"])
def test_switch_glu_layer_obeys_the_choice(cache, monkeypatch, quantized):
    layer = mk.SwitchGLU(64, 64, 8, bias=False)
    if quantized:
        import mlx.nn as nn

        nn.quantize(layer, group_size=32, bits=4)
    mx.eval(layer.parameters())
    x = mx.random.normal((3, 64))
    ids = mx.array([[0, 5], [7, 1], [2, 2]], dtype=mx.uint32)
    scores = mx.softmax(mx.random.normal((3, 2)), axis=-1)
    calls = []
    real_fused = layers.SwitchGLU._fused
    monkeypatch.setattr(layers.SwitchGLU, "_fused", lambda self, *a: calls.append("ours") or real_fused(self, *a))
    ours = layer(x, ids, scores)
    monkeypatch.setenv(dispatch.ENV_MODE, "stock")
    stock = layer(x, ids, scores)
    assert calls == ["ours"]
    # Stock is MLX's composition (reference.switch_glu) on the same weights.
    if quantized:
        weights = [p.quantized_weights() for p in (layer.gate_proj, layer.up_proj, layer.down_proj)]
        want = reference.switch_glu(x, *weights, ids, scores, group_size=32, bits=4)
    else:
        want = reference.switch_glu(x, layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight, ids, scores)
    np.testing.assert_array_equal(np.array(stock), np.array(want))
    np.testing.assert_allclose(np.array(ours), np.array(want), rtol=1e-4, atol=1e-5)


def test_cpu_and_forced_choices_never_load_the_table(monkeypatch):
    monkeypatch.setattr(dispatch, "_TABLE", None)
    monkeypatch.setattr(dispatch, "DispatchTable", lambda *a: pytest.fail("table loaded"))
    monkeypatch.delenv(dispatch.ENV_MODE, raising=False)
    assert dispatch.choose("switch_glu", "bfloat16", 1, mx.cpu, never, never) == "ours"
    monkeypatch.setenv(dispatch.ENV_MODE, "stock")
    assert dispatch.choose("switch_glu", "bfloat16", 1, mx.Device(mx.gpu), never, never) == "stock"
