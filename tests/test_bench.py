"""Tests of ``mlx-moe bench`` (bench.py and the ``bench`` CLI subcommand).

They run the harness on a tiny model shape (registered for the test) with
one timed call per implementation, and check what the harness reports:
agreement with the reference, statuses, bytes per call, the table and the
JSON; never timings. Each run takes well under a second.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe_kernels import bench, cli, reference

TINY = bench.ModelShape("tiny-moe", 256, 128, 8, 2)  # D, H, E, k


@pytest.fixture
def tiny(monkeypatch):
    """A tiny model shape for ``--model tiny-moe``, with a small cold working
    set (otherwise the harness allocates 256 MiB of weight copies)."""
    monkeypatch.setitem(bench.MODEL_SHAPES, TINY.name, TINY)
    monkeypatch.setattr(bench.workloads, "COLD_WORKING_SET_BYTES", 1 << 20)
    return TINY


def run_cli(tmp_path, capsys, *options):
    """``mlx-moe bench`` on the tiny model: (exit status, stdout, JSON report)."""
    out = tmp_path / "bench.json"
    status = cli.main(
        ["bench", "--model", TINY.name, "--repeats", "1", "--no-progress",
         "--json", str(out), *options]
    )
    text = capsys.readouterr().out
    return status, text, json.loads(out.read_text())


def expected_bytes_per_expert(rows, cols, itemsize, bits, group_size, mode):
    codes = rows * cols * bits // 8
    groups = rows * cols // group_size
    return codes + (2 * groups * itemsize if mode == "affine" else groups)


# ---------------------------------------------------------------------------
# Quantized experts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, options, bits, group_size, quant_mode",
    [
        ("switch_glu", ["--bits", "4"], 4, 64, "affine"),
        ("gather_mm", ["--bits", "8", "--group-size", "32"], 8, 32, "affine"),
        ("switch_glu", ["--quant-mode", "mxfp4"], 4, 32, "mxfp4"),
        ("gather_mm", ["--quant-mode", "mxfp4"], 4, 32, "mxfp4"),
    ],
    ids=["switch_glu-q4g64", "gather_mm-q8g32", "switch_glu-mxfp4", "gather_mm-mxfp4"],
)
def test_bench_quantized_agrees_with_reference(
    tiny, tmp_path, capsys, mode, options, bits, group_size, quant_mode
):
    # T=40 is 80 rows: above QUANTIZED_CPU_STOCK_MAX_ROWS, so stock is skipped.
    status, text, report = run_cli(
        tmp_path, capsys, "--mode", mode, "--tokens", "1,4,40",
        "--dtype", "float32,bfloat16", "--device", "cpu", *options,
    )
    assert status == cli.EXIT_OK, text
    assert report["passed"]
    wanted = {"group_size": group_size, "bits": bits, "mode": quant_mode}
    assert report["quantization"] == wanted
    label = "mxfp4" if quant_mode == "mxfp4" else f"q{bits}g{group_size}"
    assert f"--bits {bits} --group-size {group_size} --quant-mode {quant_mode}" in text
    assert f"bfloat16 {label}" in text and f"float32 {label}" in text
    assert "packed weights + scales + biases" in text

    D, H, E, k = TINY.hidden_size, TINY.expert_hidden_size, TINY.num_experts, TINY.experts_per_token
    assert len(report["cells"]) == 6
    for cell in report["cells"]:
        assert cell["quantization"] == wanted
        implementations = cell["implementations"]
        ours, stock, ref = (implementations[n] for n in ("ours", "stock", "reference"))
        # Ours agrees with the reference: float32 to float32 rounding,
        # bfloat16 to a few of its ulps.
        bound = 1e-5 if cell["dtype"] == "float32" else 2e-2
        assert ours["status"] == "ok" and ours["max_rel_error"] <= bound, cell
        assert ours["median_ms"] > 0 and len(ours["samples_ms"]) == 1
        # The reference runs once, without warm-up (slow on a CPU).
        assert ref["status"] == "ok" and len(ref["samples_ms"]) == 1
        assert ref["warmup_calls"] == 0 and ref["note"]
        if cell["rows"] <= bench.QUANTIZED_CPU_STOCK_MAX_ROWS:
            # Stock: the agreement check plus one timed call. MLX's CPU
            # gather_qmm computes half types in the half type: looser bound.
            assert stock["status"] == "ok" and len(stock["samples_ms"]) == 1, cell
            assert stock["warmup_calls"] == 1
            stock_bound = 1e-5 if cell["dtype"] == "float32" else bench.QUANTIZED_CPU_STOCK_HALF_TOLERANCE
            assert stock["max_rel_error"] <= stock_bound, cell
            assert cell["speedup_vs_stock"] > 0
        else:
            assert stock["status"] == "skipped" and stock["median_ms"] is None, cell
            assert cell["speedup_vs_stock"] is None
        # GB/s counts the packed codes, scales and biases of the experts read.
        itemsize = 4 if cell["dtype"] == "float32" else 2
        projections = [(H, D)] if mode == "gather_mm" else [(H, D), (H, D), (D, H)]
        per_expert = sum(
            expected_bytes_per_expert(r, c, itemsize, bits, group_size, quant_mode)
            for r, c in projections
        )
        distinct = cell["weight_bytes_per_call"] / per_expert  # mean distinct experts
        assert 1 <= distinct <= min(E, cell["rows"]) + 1e-9
        if cell["tokens"] == 1:  # k distinct experts per call
            assert cell["weight_bytes_per_call"] == pytest.approx(k * per_expert)
        assert cell["weight_gb_per_s"] == pytest.approx(
            cell["weight_bytes_per_call"] / (ours["median_ms"] * 1e-3) / 1e9
        )
    assert "skip (stock)" in text and "* (reference)" in text


def test_bench_quantized_stock_tolerance_only_loosens_stock(tiny):
    cell = bench.CellResult(
        mode="switch_glu", model="tiny-moe", dtype="bfloat16", tokens=1, rows=2,
        timings={
            "ours": bench.ImplementationTiming("ok", samples_s=[1e-3], error=0.05),
            "stock": bench.ImplementationTiming("ok", samples_s=[1e-3], error=0.05),
            "reference": bench.ImplementationTiming("disabled", note="--no-reference"),
        },
        tolerance=0.03, weight_bytes_per_call=1.0, flops_per_call=1.0,
        quantization=bench.Quantization(4, 64), stock_tolerance=0.25,
    )
    assert cell.failures == ["ours differs from the reference by 5.00e-02 (tolerance 3e-02)"]
    table = bench.format_table([cell])
    assert "bfloat16 q4g64" in table
    assert "5.0e-02 !" in table  # ours flagged
    assert "stock on quantized experts: bfloat16 0.25" in table


def test_grouped_quantized_references_match_the_oracles():
    """The cheap per-expert reference of the agreement check computes what
    reference.gather_qmm / reference.switch_glu compute."""
    D, H, E, k, T = 128, 64, 6, 2, 5
    quantization = bench.Quantization(4, 32, "affine")
    dtype = mx.bfloat16
    key = mx.random.key(3)
    gate, up, down = (
        quantization.quantize(mx.random.normal(shape, key=mx.random.key(i)).astype(dtype) * 0.1, dtype)
        for i, shape in enumerate([(E, H, D), (E, H, D), (E, D, H)])
    )
    assert gate[1].dtype == dtype and gate[2].dtype == dtype
    rng = np.random.default_rng(0)
    indices = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.uint32)
    x = mx.random.normal((T, D), key=key).astype(dtype)
    scores = mx.softmax(mx.random.normal((T, k), key=mx.random.key(9)), axis=-1).astype(dtype)
    oracle = reference.switch_glu(
        x, gate, up, down, mx.array(indices), scores, **quantization.kwargs()
    )
    grouped = bench.grouped_reference_switch_glu(x, gate, up, down, indices, scores, quantization)
    assert grouped.dtype == oracle.dtype
    np.testing.assert_allclose(
        np.array(grouped.astype(mx.float32)), np.array(oracle.astype(mx.float32)), rtol=0, atol=1e-2
    )  # the same float32 products: equal up to one bfloat16 rounding

    mxfp4 = bench.Quantization(4, 32, "mxfp4")
    weight = mxfp4.quantize(mx.random.normal((E, H, D), key=key), mx.float32)
    assert weight[2] is None and weight[1].dtype == mx.uint8
    sorted_experts = np.sort(rng.integers(0, E, size=9)).astype(np.uint32)
    rows = mx.random.normal((9, 1, D), key=mx.random.key(5))
    oracle = reference.gather_qmm(
        rows, *weight, rhs_indices=mx.array(sorted_experts), **mxfp4.kwargs()
    )
    grouped = bench.grouped_reference_gather_qmm(rows, weight, sorted_experts, mxfp4)
    np.testing.assert_allclose(np.array(grouped), np.array(oracle), rtol=1e-5, atol=1e-5)


def test_make_quantization_defaults_and_errors():
    assert bench.make_quantization() is None
    assert bench.make_quantization(bits=4) == bench.Quantization(4, 64, "affine")
    assert bench.make_quantization(group_size=128) == bench.Quantization(4, 128, "affine")
    assert bench.make_quantization(mode="mxfp4") == bench.Quantization(4, 32, "mxfp4")
    assert bench.Quantization(3, 64).label == "q3g64"
    assert bench.Quantization(4, 32, "mxfp4").label == "mxfp4"
    for bad in (dict(bits=7), dict(group_size=48), dict(mode="mxfp4", bits=8),
                dict(mode="mxfp4", group_size=64), dict(mode="nvfp4")):
        with pytest.raises(ValueError):
            bench.make_quantization(**bad)


@pytest.mark.parametrize(
    "options",
    [["--bits", "7"], ["--group-size", "48"], ["--quant-mode", "mxfp4", "--bits", "8"],
     ["--quant-mode", "nvfp4"], ["--bits", "0"]],
)
def test_cli_bench_quantized_usage_errors(tiny, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", TINY.name, "--tokens", "1", "--no-progress", *options])
    assert exit_info.value.code == cli.EXIT_USAGE


def test_cli_bench_group_size_must_divide_the_model(monkeypatch, capsys):
    odd = bench.ModelShape("odd-moe", 96, 64, 4, 2)
    monkeypatch.setitem(bench.MODEL_SHAPES, odd.name, odd)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", odd.name, "--tokens", "1", "--bits", "4", "--no-progress"])
    assert exit_info.value.code == cli.EXIT_USAGE
    assert "group size 64" in capsys.readouterr().err


def test_cli_bench_help_lists_the_quantization_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = capsys.readouterr().out
    for option in ("--bits", "--group-size", "--quant-mode", "mxfp4", "gather_qmm"):
        assert option in text


# ---------------------------------------------------------------------------
# Float experts (unchanged behaviour)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["switch_glu", "gather_mm"])
def test_bench_float_experts(tiny, tmp_path, capsys, mode):
    status, text, report = run_cli(
        tmp_path, capsys, "--mode", mode, "--tokens", "1,40", "--dtype", "float32,bfloat16",
        "--device", "cpu",
    )
    assert status == cli.EXIT_OK, text
    assert report["quantization"] is None
    assert "--bits" not in text and "*" not in text
    assert "distinct expert weights read per call" in text
    D, H, k = TINY.hidden_size, TINY.expert_hidden_size, TINY.experts_per_token
    projections = 1 if mode == "gather_mm" else 3
    for cell in report["cells"]:
        assert cell["quantization"] is None
        ours, stock = cell["implementations"]["ours"], cell["implementations"]["stock"]
        assert ours["status"] == "ok" and ours["max_rel_error"] <= cell["tolerance"]
        if cell["dtype"] == "float32":  # MLX's CPU gather_mm: float32 only
            assert stock["status"] == "ok" and stock["max_rel_error"] <= cell["tolerance"]
            assert stock["note"] is None
        else:
            assert stock["status"] == "unsupported"
        itemsize = 4 if cell["dtype"] == "float32" else 2
        if cell["tokens"] == 1:
            assert cell["weight_bytes_per_call"] == pytest.approx(projections * k * H * D * itemsize)
