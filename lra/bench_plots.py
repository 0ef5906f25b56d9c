"""The benchmark's plots: ``time_vs_n.png`` and ``memory_vs_n.png`` (log-log against N, one line per
attention variant, dashed where the method materialises N×N, one panel per head size), from the operator
rows of a ``rows.jsonl`` (``lra/bench_report.py``, ``lra/gpu_check_report.py``)."""

from __future__ import annotations

import math
from pathlib import Path

from lra.bench_rows import METRICS, OperatorTable, _setting_text


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def plot(table: OperatorTable, out_dir: Path) -> list[Path]:
    """time_vs_n.png (fwd and fwd+bwd rows) and memory_vs_n.png, one panel per d, for the first setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    if not table.settings:
        return []
    setting = table.settings[0]
    head_dims = table.head_dims(setting)
    colours = plt.get_cmap("tab10" if len(table.labels) <= 10 else "tab20")
    style = {
        label: {
            "color": colours(i % colours.N),
            "linestyle": "--" if label in table.quadratic else "-",
            "marker": "o",
            "markersize": 3,
            "label": label,
        }
        for i, label in enumerate(table.labels)
    }
    written = []
    for name, metrics in (("time_vs_n", ["fwd_ms", "fwd_bwd_ms"]), ("memory_vs_n", ["peak_mb"])):
        fig, axes = plt.subplots(
            len(metrics), len(head_dims), squeeze=False, figsize=(5.2 * len(head_dims), 3.8 * len(metrics))
        )
        for row_axes, metric in zip(axes, metrics, strict=True):
            for ax, head_dim in zip(row_axes, head_dims, strict=True):
                for label in table.labels:
                    ns, values = table.series(setting, head_dim, label, metric)
                    points = [
                        (n, v)
                        for n, v in zip(ns, values, strict=True)
                        if v is not None and math.isfinite(v) and v > 0
                    ]
                    if points:
                        ax.plot(*zip(*points, strict=True), **style[label])
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                lengths = table.lengths(setting, head_dim)
                ax.set_xticks(lengths, [_short(n) for n in lengths])
                ax.xaxis.set_minor_locator(ticker.NullLocator())
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                ax.set_xlabel("sequence length N")
                ax.set_ylabel(METRICS[metric])
                ax.set_title(f"d = {head_dim}")
                ax.grid(True, which="both", alpha=0.3)
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.suptitle(f"{table.rows[0].get('device_name')}: {_setting_text(setting)}", fontsize=10)
        fig.tight_layout()
        fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
