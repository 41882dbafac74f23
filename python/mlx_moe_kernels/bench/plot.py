"""Plotting a run: our speedup against the token count (needs matplotlib)."""

from __future__ import annotations

from typing import Dict, List

from mlx_moe_kernels.bench.results import BenchReport


def plot_speedups(report: BenchReport, path: str) -> None:
    """Save a plot of our speedup against the token count to ``path``.

    One line per model and dtype, over stock (left) and over the reference
    (right); log-scaled token axis.

    Raises:
        ImportError: When matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import ScalarFormatter

    series: Dict[str, Dict[str, List[tuple]]] = {"stock": {}, "reference": {}}
    for cell in report.cells:
        for versus, lines in series.items():
            speedup = cell.speedup_over(versus)
            if speedup is not None:
                lines.setdefault(f"{cell.model} {cell.dtype_label}", []).append(
                    (cell.tokens, speedup)
                )
    labels = sorted({label for lines in series.values() for label in lines})
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    titles = {"stock": "ours vs stock MLX", "reference": "ours vs plain-MLX reference"}
    for axis, (versus, lines) in zip(axes, series.items()):
        for label, points in lines.items():
            points.sort()
            axis.plot(
                [p[0] for p in points], [p[1] for p in points],
                marker="o", label=label, color=colors[label],
            )
        axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.set_xlabel("tokens T")
        axis.set_ylabel("speedup of ours (x, log)")
        axis.set_title(titles[versus])
        if lines:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, "not measured", ha="center", transform=axis.transAxes)
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle(f"mlx-moe bench --mode {report.mode} ({report.machine.get('device')})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
