"""First-use checks of the GPU kernels (``mlx_moe_kernels.verify``). No
GPU here: each failure cause a Mac could meet is forced by replacing the
check's cases with ones that fail that way (the messages are what MLX's
Metal backend and our plans raise), and the real cases are run on the CPU
for the passing path. Each failure must give one warning naming the
cause, and the family must then stay on MLX's ops."""

from __future__ import annotations

import warnings

import mlx.core as mx
import pytest

import mlx_moe_kernels as mk
from mlx_moe_kernels import layers, selftest, verify

GPU = mx.Device(mx.gpu)


@pytest.fixture(autouse=True)
def fresh():
    verify.reset()
    yield
    verify.reset()


def cases_that(fail):
    """selftest's float32 cases, each replaced by ``fail`` (a function of
    the real case and the device)."""
    real = selftest._families

    def families(dtype, rng):
        return {name: (lambda device, case=case: fail(case, device)) for name, case in real(dtype, rng).items()}

    return families


def raising(message):
    def fail(case, device):
        raise RuntimeError(message)
    return fail


CAUSES = {
    "metallib missing": raising("[metal::Device] Unable to load kernel library mlx_moe_kernels.metallib"),
    "function missing": raising("[metal::Device] Unable to load function switch_glu_gate_up_bfloat16"),
    "pipeline limit": raising("[switch_glu] the launch plan needs 1024 threads per threadgroup; the pipeline allows 512"),
}


@pytest.mark.parametrize("cause", list(CAUSES) + ["wrong result"])
def test_a_failure_warns_once_and_falls_back(monkeypatch, cause):
    if cause == "wrong result":
        def fail(case, device):
            ours, stock, want = case(mx.cpu)
            return ours * 1.01, stock, want
    else:
        fail = CAUSES[cause]
    monkeypatch.setattr(selftest, "_families", cases_that(fail))
    with pytest.warns(RuntimeWarning) as record:
        assert verify.kernel_family_ok("switch_glu", GPU) is False
    assert len(record) == 1
    text = str(record[0].message)
    assert "switch_glu" in text and "MLX's own ops" in text
    assert ("wrong result" in text) if cause == "wrong result" else ("raised RuntimeError" in text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second check
        monkeypatch.setattr(selftest, "_families", cases_that(raising("checked twice")))
        assert verify.kernel_family_ok("switch_glu", GPU) is False


def test_passing_check_and_cpu_skip(monkeypatch):
    # The real cases (run on the CPU in place of a GPU) pass.
    monkeypatch.setattr(selftest, "_families", cases_that(lambda case, device: case(mx.cpu)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verify.kernel_family_ok("switch_glu", GPU) is True
    # The CPU is never checked at run time.
    monkeypatch.setattr(selftest, "_families", cases_that(raising("must not run")))
    assert verify.kernel_family_ok("switch_glu", mx.cpu) is True


def test_layer_uses_stock_after_a_failed_check(monkeypatch):
    layer = mk.SwitchGLU(64, 64, 8, bias=False)
    mx.eval(layer.parameters())
    x = mx.random.normal((3, 64))
    ids = mx.array([[0, 5], [7, 1], [2, 2]], dtype=mx.uint32)
    scores = mx.softmax(mx.random.normal((3, 2)), axis=-1)
    used = []
    real_stock = layers.SwitchGLU._stock
    monkeypatch.setattr(layers.SwitchGLU, "_stock", lambda self, *a: used.append("stock") or real_stock(self, *a))
    monkeypatch.setattr(layers.SwitchGLU, "_fused", lambda self, *a: pytest.fail("fused kernels used"))
    monkeypatch.setattr(verify, "kernel_family_ok", lambda family, device: family != "switch_glu")
    out = layer(x, ids, scores)
    assert used == ["stock"] and out.shape == (3, 64)
