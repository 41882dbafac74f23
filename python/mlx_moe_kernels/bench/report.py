"""Presenting a run: the plain-text tables of ``mlx-moe bench`` (the cell
modes' and the model mode's) and the number formats they use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

if TYPE_CHECKING:  # the tables read the results' fields only
    from mlx_moe_kernels.bench.model_results import ModelBenchReport
    from mlx_moe_kernels.bench.results import CellResult

_STATUS_MARKS = {
    "unsupported": "n/a",
    "skipped": "skip",
    "disabled": "off",
    "failed": "FAIL",
}


def format_ms(seconds: float) -> str:
    """Seconds as milliseconds, 3 significant digits or more."""
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 1000 else f"{ms:.0f}"


def format_speedup(ratio: Optional[float]) -> str:
    """A speedup as ``1.23x`` / ``12.3x`` / ``123x``; ``-`` for ``None``."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x" if ratio < 100 else f"{ratio:.0f}x"


def format_rate(rate: Optional[float]) -> str:
    """A rate (GB/s, GFLOP/s) to 3 significant digits; ``-`` for ``None``."""
    if rate is None:
        return "-"
    return f"{rate:.2f}" if rate < 10 else f"{rate:.1f}" if rate < 1000 else f"{rate:.0f}"


def aligned_lines(
    header: Sequence[str], rows: Sequence[Sequence[str]], left_aligned: Sequence[int] = (0,)
) -> List[str]:
    """``header``, a rule of dashes and ``rows`` as lines of columns two
    spaces apart, each column as wide as its widest value; the columns in
    ``left_aligned`` are padded on the right, the others on the left."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(values):
        return "  ".join(
            v.ljust(w) if i in left_aligned else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths))
        ).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_table(cells: Sequence[CellResult]) -> str:
    """Cells as an aligned plain-text table followed by footnotes.

    Times are medians in ms; ``x stock`` and ``x ref`` are the speedups of
    ours; GB/s counts the distinct expert weights a call reads (quantized
    experts: their packed codes, scales and biases); errors are max abs
    errors relative to the reference's max magnitude; a value not measured
    shows its reason's mark (n/a, skip, off, FAIL), and a time from a single
    call a ``*``, explained below the table. Quantized cells show their
    format after the dtype (``bfloat16 q4g64``, ``float32 mxfp4``).
    """
    header = [
        "model", "dtype", "T", "rows", "ours ms", "stock ms", "ref ms",
        "x stock", "x ref", "GB/s", "GFLOP/s", "err ours", "err stock",
    ]
    notes: Dict[tuple, None] = {}
    rows = []
    for cell in cells:
        def time_column(name: str) -> str:
            timing = cell.timings[name]
            if timing.status == "ok":
                if timing.note:
                    notes[("*", name, timing.note)] = None
                    return format_ms(timing.median_s) + "*"
                return format_ms(timing.median_s)
            mark = _STATUS_MARKS[timing.status]
            notes[(mark, name, timing.note)] = None
            return mark

        def error_column(name: str) -> str:
            error = cell.timings[name].error
            if error is None:
                return "-"
            flag = "" if error <= cell.tolerance_of(name) else " !"
            return f"{error:.1e}{flag}"

        rows.append([
            cell.model, cell.dtype_label, str(cell.tokens), str(cell.rows),
            time_column("ours"), time_column("stock"), time_column("reference"),
            format_speedup(cell.speedup_over("stock")),
            format_speedup(cell.speedup_over("reference")),
            format_rate(cell.weight_gb_per_s), format_rate(cell.gflop_per_s),
            error_column("ours"), error_column("stock"),
        ])
    out = aligned_lines(header, rows, left_aligned={0, 1})
    tolerances = sorted({(c.dtype, c.tolerance) for c in cells})
    out.append("")
    if any(c.quantization is not None for c in cells):
        read = "packed weights + scales + biases of the distinct experts"
    else:
        read = "distinct expert weights"
    out.append(
        "times: median ms per call (cache-cold, interleaved); x stock / x ref: "
        f"speedup of ours; GB/s: {read} read per call / ours"
    )
    out.append(
        "err: max |out - reference| / max |reference| on one call; tolerance "
        + ", ".join(f"{d} {t:.0e}" for d, t in tolerances)
        + " ('!' = above)"
    )
    stock_tolerances = sorted({(c.dtype, c.stock_tolerance) for c in cells if c.stock_tolerance})
    if stock_tolerances:
        out.append(
            "  stock on quantized experts: "
            + ", ".join(f"{d} {t:g}" for d, t in stock_tolerances)
            + " (MLX's CPU gather_qmm computes in the half type)"
        )
    for mark, name, note in notes:
        out.append(f"{mark} ({name}): {note}")
    return "\n".join(out)


def format_model_table(report: ModelBenchReport) -> str:
    """A model-mode run as a table of the parts of a decode step (rows per
    format: each part, the rest, the whole step; median ms, share of the
    step, MB read per step, GB/s), then one summary line per format
    (prefill and decode tokens/s, the step's bytes and GB/s against the
    read-bandwidth probe) and footnotes."""
    rows = []
    for result in report.formats:
        step = result.step_s

        def row(part: str, seconds: float, n_bytes: float, rate: Optional[float]) -> List[str]:
            return [result.format, part, format_ms(seconds), f"{100 * seconds / step:.0f}%",
                    format_rate(n_bytes / 1e6), format_rate(rate)]

        rows += [row(p.name, p.median_s, p.bytes_read, p.gb_per_s) for p in result.parts]
        rows.append(row("rest", result.rest_s, result.rest_bytes, None))
        rows.append(row("decode step", step, result.step_bytes, result.step_gb_per_s))
    out = aligned_lines(["format", "part", "ms", "of step", "MB", "GB/s"], rows, left_aligned={0, 1})
    out.append("")
    for result in report.formats:
        out.append(
            f"{result.format}: {format_rate(result.weight_bytes / 1e9)} GB of weights; "
            f"prefill {result.prefill_tokens} tokens: {format_rate(result.prefill_tokens_per_s)} tok/s; "
            f"decode {result.decode_tokens} tokens: {format_rate(result.decode_tokens_per_s)} tok/s; "
            f"a step reads {format_rate(result.step_bytes / 1e6)} MB in {format_ms(result.step_s)} ms: "
            f"{format_rate(result.step_gb_per_s)} GB/s, {100 * result.bandwidth_share:.0f}% of the "
            f"{format_rate(result.read_gb_per_s)} GB/s read probe"
        )
    out.append("")
    contexts = sorted({r.context_positions for r in report.formats})
    out.append(
        "parts: median ms of calls on saved one-token inputs, all layers per call, cache-cold "
        "(caches evicted before each call; experts on disjoint expert sets), "
        f"at {', '.join(map(str, contexts))} cached positions; MB: bytes a part must read per step "
        "(experts: k/E of the expert weights; attention: norms and KV cache)"
    )
    out.append(
        "decode step: median step of the decode runs; rest = step - parts (embedding, residuals, "
        "argmax, graph building; negative when the separately evaluated parts add up to more)"
    )
    return "\n".join(out)

