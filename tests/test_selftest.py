"""``mlx-moe selftest``: every kernel family passes its oracle check on this
machine, the report's JSON has the documented structure, and the Markdown
holds the tables a user pastes into an issue. (The timed shape is shrunk:
the speed figures themselves are not asserted.)"""

from __future__ import annotations

import json

import pytest

from mlx_moe_kernels import cli, selftest

FAMILIES = {
    "gather_mm", "gather_qmm (4-bit)", "switch_glu", "switch_glu (4-bit)", "linear", "quantized_linear (4-bit)",
    "scaled_dot_product_attention", "rope", "rms_norm", "softmax_top_k",
}


@pytest.fixture
def small_timed_shape(monkeypatch):
    monkeypatch.setattr(selftest, "TIMED_SHAPE", (256, 128, 16, 4))


def test_every_family_passes_on_every_dtype():
    checks = selftest.run_checks()
    assert {c.family for c in checks} == FAMILIES
    assert {c.dtype for c in checks} == {"float32", "float16", "bfloat16"}
    assert not [c for c in checks if not c.passed], [c for c in checks if not c.passed]
    # MLX's own ops pass the same oracle within the same tolerance (the
    # oracle is not what fails) where they run: MLX's CPU gather_mm takes
    # float32 only.
    ran = [c for c in checks if c.stock_error is not None]
    assert len(ran) >= len(checks) - 2 and all(c.stock_error <= c.tolerance for c in ran), ran


def test_a_wrong_kernel_fails_its_check(monkeypatch):
    """The check can fail: a kernel made to return something else."""
    import mlx_moe_kernels as mk

    real = mk.rms_norm
    monkeypatch.setattr(mk, "rms_norm", lambda x, w, eps, **kw: real(x, w, eps, **kw) * 1.1)
    failed = {c.family for c in selftest.run_checks() if not c.passed}
    assert failed == {"rms_norm"}


def test_cli_json_and_markdown(tmp_path, capsys, small_timed_shape):
    path = tmp_path / "selftest.json"
    assert cli.main(["selftest", "--quick", "--json", str(path)]) == cli.EXIT_OK
    text = capsys.readouterr().out
    assert "## mlx-moe selftest" in text and "### Correctness" in text and "### Speed" in text
    report = json.loads(path.read_text())
    assert set(report) == {"machine", "checks", "timings", "summary"}
    for key in ("platform", "mlx_version", "mlx_moe_kernels_version", "cpu", "cpu_kernel_build", "threads", "gpu"):
        assert key in report["machine"], key
    assert report["machine"]["cpu_kernel_build"] in ("avx512", "avx2", "portable")
    assert report["summary"] == {"passed": True, "failures": []}
    for check in report["checks"]:
        assert set(check) == {"family", "device", "dtype", "ours_error", "stock_error", "tolerance", "passed"}
        assert isinstance(check["ours_error"], float) and check["passed"] is True
    assert {(t["op"], t["shape_class"]) for t in report["timings"]} == {
        ("switch_glu bf16", "decode"), ("switch_glu 4-bit", "decode")}
    for timing in report["timings"]:
        assert timing["ours_ms"] > 0 and timing["stock_ms"] > 0 and timing["faster"] in ("ours", "stock")
