"""Heads analysis: fixed model width D = h·d, more heads of smaller size, every attention's time and memory.

    python -m lra.analysis.heads                        # CPU: D = 128, h ∈ {2, 4, 8, 16}, N = 256 … 4096
    python -m lra.analysis.heads --smoke --out /tmp/h   # tiny shapes, seconds
    python -m lra.analysis.heads --device cuda --dtype bfloat16 --width 512 --heads 4 8 16 32 \\
        --seq-lens 1024 2048 4096 8192 16384 --label h100      # a GPU grid

TaylorShift's efficient mode costs O(N·h·d³) = O(N·D³/h²) at fixed width, its direct mode O(N²·D) whatever
h is, so more, smaller heads should move the efficient mode's crossover down to N0 = d² + d + 1 per head
(Nauen et al. 2024). Each (h, d) pair runs through the operator level of ``python -m lra.bench``, so the
numbers are measured exactly as the benchmark measures them. Writes ``heads_<label>.md``, ``.png`` and the
rows (``.jsonl``) to ``--out`` (default ``outputs/analyses``; the committed copy: ``--out results/analyses``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from omegaconf import OmegaConf

from data.cache import atomic_write_text
from lra.analysis.runs import analysis_parser, save_figure
from lra.bench import DTYPES, calibration_row, environment, select_device, shared_bench_config
from lra.bench_levels import OperatorBench, variants_from_config
from lra.bench_rows import METRICS, OperatorTable, load_rows, metric_value
from lra.errors import ConfigError, MissingDataError, run_cli
from lra.markdown import md_table
from lra.registry import registered_attentions
from lra.summary import REPO_ROOT, to_jsonable
from models.attention.crossover import crossover_n0, crossover_n1

# The variants every (h, d) pair runs; Linformer's projected length is capped by the shortest N.
VARIANTS = {
    "softmax": [{"backend": "auto"}, {"backend": "math", "quadratic": True}],
    "taylorshift": [{"mode": "direct", "quadratic": True}, {"mode": "efficient"}],
}
DIRECT, EFFICIENT = "taylorshift mode=direct", "taylorshift mode=efficient"


def bench_config(args: argparse.Namespace, heads: int, head_dim: int) -> Any:
    """conf/bench.yaml's shared keys (seed, FLOP conventions) with one (h, d) pair of this grid as preset."""
    variants = {**VARIANTS, "linformer": [{"proj_len": min(256, min(args.seq_lens))}]}
    calibration = {"matmul_n": 64 if args.smoke else 1024, "copy_mb": 1 if args.smoke else 64, "repeats": 3}
    operator_level = {
        "batch": [1],
        "heads": [heads],
        "head_dim": [head_dim],
        "seq_len": sorted(args.seq_lens),
        "causal": [False],
        "masked": [False],
        "warmup": 1,
        "repeats": args.repeats,
        "max_n_quadratic": max(args.seq_lens),
        "point_budget_s": args.point_budget_s,
        "gate_max_n": min(1024, max(args.seq_lens)),
        "gate_tol": {"float64": 1e-8, "float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2},
    }
    return OmegaConf.merge(
        shared_bench_config(),
        {"calibration": calibration, "bench": {"variants": variants, "operator_level": operator_level}},
    )


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (h, D/h) pair through the benchmark's operator level; rows as ``lra.bench`` writes them."""
    device, dtype = select_device(args.device), DTYPES[args.dtype]
    env = environment(device)
    rows: list[dict[str, Any]] = []
    for heads in args.heads:
        if args.width % heads:
            raise ConfigError(f"--width {args.width} is not divisible by {heads} heads")
        head_dim = args.width // heads
        cfg = bench_config(args, heads, head_dim)
        if not rows:
            rows.append({"kind": "calibration", **env, **calibration_row(cfg, device, dtype)})
        variants = variants_from_config(cfg.bench.variants, registered_attentions(args.attentions))
        for row in OperatorBench(cfg, variants, device, dtype, env, None).rows():
            rows.append(row | {"width": args.width})
            cell = (
                "skipped" if row.get("skipped") else row.get("error") or f"{row.get('fwd_bwd_ms', 0):.1f} ms"
            )
            print(f"h={heads:3d} d={head_dim:4d} N={row['seq_len']:6d} {row['label']:30s} {cell}", flush=True)
    return rows


def crossover_table(table: OperatorTable) -> list[str]:
    """Per head size: TaylorShift efficient against direct (measured) beside N0 / N1, and against softmax."""
    header = "h|d|faster than direct (fwd)|(fwd+bwd)|N0 = d²+d+1|less memory than direct (fwd+bwd)|N1|"
    header += "faster than softmax SDPA (fwd+bwd)|faster than softmax math (fwd+bwd)"
    body = []
    for setting, d in table.grids():
        fwd, fwd_bwd, memory = table.crossover_texts(setting, d, EFFICIENT, DIRECT)
        softmax = [
            table.crossover(setting, d, EFFICIENT, f"softmax backend={backend}", "fwd_bwd_ms").text()
            for backend in ("auto", "math")
        ]
        n0, n1 = f"{crossover_n0(d):,}", f"{crossover_n1(d):,}"
        body.append([str(setting[2]), str(d), fwd, fwd_bwd, n0, memory, n1, *softmax])
    return md_table(header.split("|"), body)


def at_length_table(table: OperatorTable, n: int, metric: str) -> list[str]:
    """Every variant's ``metric`` at one N, one column per head count (fixed width)."""
    pairs = table.grids()
    body = []
    for label in table.labels:
        values = [metric_value(table.get(s, d, label, n), metric) for s, d in pairs]
        cells = ["—" if v is None else "OOM" if v == math.inf else f"{v:.3g}" for v in values]
        body.append([f"`{label}`", *cells])
    return md_table(["variant", *(f"h={s[2]}, d={d}" for s, d in pairs)], body)


def _plot_measured(axis: Any, xs: Sequence, ys: Sequence, *style: str, **kwargs: Any) -> None:
    """Plot the points that have a finite value (not missing, not out of memory)."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y != math.inf]
    if points:
        axis.plot(*zip(*points, strict=True), *style, marker="o", **kwargs)


def plot(table: OperatorTable, path: Path, width: int) -> Path:
    figure = Figure(figsize=(16, 4.5), layout="constrained")
    axes = figure.subplots(1, 3)
    pairs = table.grids()
    for index, (setting, d) in enumerate(pairs):
        for label, style in ((EFFICIENT, "-"), (DIRECT, "--")):
            for axis, metric in zip(axes[:2], ("fwd_bwd_ms", "peak_mb"), strict=True):
                name = f"{label.split('=')[1]} h={setting[2]} d={d}"
                _plot_measured(
                    axis, *table.series(setting, d, label, metric), style, color=f"C{index}", label=name
                )
    longest = max(n for setting, d in pairs for n in table.lengths(setting, d))
    heads = [setting[2] for setting, _ in pairs]
    for index, label in enumerate(table.labels):
        values = [metric_value(table.get(s, d, label, longest), "fwd_bwd_ms") for s, d in pairs]
        _plot_measured(axes[2], heads, values, color=f"C{index}", label=label)
    titles = [f"TaylorShift {METRICS[metric]}, D = {width}" for metric in ("fwd_bwd_ms", "peak_mb")]
    titles.append(f"forward + backward (ms) at N = {longest:,}")
    for axis, title, x_label in zip(axes, titles, ("N", "N", f"heads h (d = {width}/h)"), strict=True):
        axis.set_xscale("log", base=2)
        axis.set(yscale="log", xlabel=x_label, title=title)
        axis.legend(fontsize=6)
    return save_figure(figure, path)


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace) -> Path:
    table = OperatorTable(rows)
    run = next((row for row in rows if row["kind"] == "calibration"), {})
    measured = next((row for row in rows if row["kind"] == "heads_run"), {"argv": args.argv, "seconds": 0.0})
    # The grid (width, heads, lengths) is the one that was measured, not a --report-only command's defaults.
    args = parse([*measured["argv"], "--out", str(args.out), "--label", args.label])
    command = " ".join(["python -m lra.analysis.heads", *measured["argv"]])
    longest = max(args.seq_lens)
    figure = plot(table, args.out / f"heads_{args.label}.png", args.width)
    problems = [
        row for row in rows if row["kind"] == "operator" and (row.get("error") or row.get("gate_ok") is False)
    ]
    lines = [
        f"# Heads analysis: fixed width D = {args.width}, h ∈ {list(args.heads)}, d = D/h ({args.label})",
        "",
        f"Command: `{command}` ({measured['seconds'] / 60:.1f} min).",
        "",
        f"Machine: {run.get('device_name', '?')}, torch {run.get('torch', '?')}, {run.get('threads', '?')} "
        f"threads, {args.dtype}, B = 1, non-causal, unmasked; matmul calibration "
        f"{run.get('matmul_gflops', float('nan')):.1f} GFLOP/s. Medians of {args.repeats} repeats "
        f"(lra.bench operator level; peak memory = allocator peak above the inputs).",
        "",
        f"Figure: `heads_{args.label}.png` (left/centre: TaylorShift efficient (solid) and direct (dashed) "
        f"against N per head count; right: every variant at N = {longest:,} against h). Rows: "
        f"`heads_{args.label}.jsonl`.",
        "",
        "## TaylorShift crossovers per head size: measured beside the paper's N0 / N1",
        "",
        "Measured: the smallest grid N from which the efficient mode stays faster (or lighter) than the "
        "other method at every larger grid N (≈ log-log interpolation between the bracketing points); "
        "`≤ n` = already at the smallest N, `> n` = not within the grid.",
        "",
        *crossover_table(table),
        f"## Forward + backward time (ms) at N = {longest:,}",
        "",
        *at_length_table(table, longest, "fwd_bwd_ms"),
        f"## Peak memory (MB, forward + backward) at N = {longest:,}",
        "",
        *at_length_table(table, longest, "peak_mb"),
    ]
    if problems:
        lines += ["## Failed points", ""] + [
            f"- {row['label']} h={row['heads']} N={row['seq_len']}: {row.get('error') or 'gate failed'}"
            for row in problems
        ]
    path = args.out / f"heads_{args.label}.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {path} and {figure}")
    return path


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = analysis_parser("heads", __doc__, REPO_ROOT, "tiny shapes: width 16, h ∈ {2, 4}, N ≤ 64")
    parser.add_argument("--width", type=int, default=128, help="D = h·d, fixed")
    parser.add_argument("--heads", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--attentions", nargs="+", default=None, help="default: every registered attention")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--point-budget-s", type=float, default=120.0, help="skip longer points predicted slower"
    )
    parser.add_argument("--label", default="cpu")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the JSONL")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.smoke:
        args.width, args.heads, args.seq_lens, args.repeats = 16, [2, 4], [16, 32, 64], 2
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / f"heads_{args.label}.jsonl"
    if args.report_only:
        if not jsonl.is_file():
            raise MissingDataError(
                f"--report-only: no rows at {jsonl}; measure first (without --report-only)"
            )
        rows = load_rows(jsonl)
    else:
        started = time.time()
        rows = measure(args)
        rows.append({"kind": "heads_run", "argv": args.argv, "seconds": time.time() - started})
        atomic_write_text(jsonl, "".join(json.dumps(to_jsonable(row), sort_keys=True) + "\n" for row in rows))
    return write_report(rows, args)


if __name__ == "__main__":
    run_cli(main, prog="python -m lra.analysis.heads")
