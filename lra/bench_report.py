"""The benchmark's report.md and plots (time_vs_n.png, memory_vs_n.png), from its rows.jsonl alone.

python -m lra.bench_report results/efficiency/cpu/rows.jsonl     # rewrite report.md and the plots
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from data.cache import atomic_write, atomic_write_text
from lra.bench_rows import METRICS, OperatorTable, device_label, load_rows, setting_text, status_text
from lra.markdown import md_table
from lra.registry import published_efficiency_4k
from lra.summary import REPO_ROOT
from models.attention.crossover import crossover_n0, crossover_n1


def fmt(value: float | None) -> str:
    """Three significant digits with thousands separators; "—" for None."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def _cell(row: dict[str, Any] | None, metric: str) -> str:
    if row is None:
        return ""
    if status := status_text(row):
        return status
    value, iqr = row.get(metric), row.get(f"{metric}_iqr")
    return fmt(value) + (f" ±{50 * iqr / value:.0f}%" if iqr and value else "")


def find_row(rows: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((r for r in rows if r.get("kind") == kind), None)


def environment_section(
    run: dict[str, Any], end: dict[str, Any] | None, calibration: dict[str, Any] | None
) -> list[str]:
    versions = ", ".join(f"{key} {run.get(key)}" for key in ("torch", "triton", "cuda", "cudnn", "python"))
    lines = [
        "## Environment",
        "",
        f"- device: **{run.get('device_name')}** ({run.get('device')}); {run.get('threads')} torch threads, "
        f"{run.get('cpu_count')} logical CPUs",
        f"- versions: {versions}",
        f"- git commit: `{run.get('git_commit')}`; preset `bench={run.get('preset')}`; "
        f"started {run.get('started')}",
    ]
    load_start = run.get("load_avg_start")
    load_end = end.get("load_avg_end") if end else None
    if load_start:
        text = f"- load average (1/5/15 min) at start: {', '.join(f'{x:.2f}' for x in load_start)}"
        if load_end:
            text += f"; at the end: {', '.join(f'{x:.2f}' for x in load_end)}"
        lines.append(text + " (every row also records the 1-minute load when it was measured: `load1`)")
        cores = run.get("cpu_count") or 1
        if run.get("device") == "cpu" and max(load_start[0], (load_end or [0])[0]) > 0.5 * cores:
            lines.append(
                f"- **The machine was shared** (load above half of its {cores} cores): other jobs "
                "competed for the cores, so timings carry contention noise; ratios measured in the "
                "same run are more reliable than absolute times."
            )
    grid = (run.get("config") or {}).get("operator_level")
    if grid:
        lines.append(
            f"- operator grid: d ∈ {grid['head_dim']}, N ∈ {grid['seq_len']}, B ∈ {grid['batch']}, "
            f"h ∈ {grid['heads']}, {run.get('dtype')}, warm-up {grid['warmup']}, {grid['repeats']} repeats; "
            f"materialised methods up to N = {grid['max_n_quadratic']:,}; points predicted to take over "
            f"{grid['point_budget_s']} s skipped"
        )
    if end and end.get("wall_s"):
        lines.append(f"- wall time of the run: {end['wall_s'] / 60:.1f} min")
    if calibration:
        lines.append(
            f"- calibration ({calibration['dtype']}): {calibration['matmul_n']}³ matmul "
            f"{calibration['matmul_gflops']:,.1f} GFLOP/s; copy {calibration['copy_gb_s']:,.1f} GB/s"
        )
    return lines + [f"- note: {note}" for note in run.get("notes") or []] + [""]


METHOD_TEXT = """## Method

- Operator level: each attention module (built from `conf/attention/<name>.yaml` plus the variant's overrides,
  same seed for every variant) on the same fresh N(0, 1) `q, k, v [B, h, N, d]`, all methods interleaved per
  shape in one process. **fwd** = forward under `torch.no_grad()`; **fwd+bwd** = forward and backward with a
  random dO (gradients w.r.t. q, k, v and the module's parameters). Warm-up calls first (compilation
  included), then the median of the repeats; `±x%` is half the interquartile range relative to the median.
  Timing: CUDA events on a GPU; on a CPU `time.perf_counter` around each call, on the preset's number of
  torch threads (one by default: on a shared machine a second OpenMP thread mostly waits for its peer).
- Peak memory: the peak of tensor bytes allocated during one fwd+bwd above what was live before it (the
  inputs and dO are excluded; the gradients are included). On CUDA, the rise of `max_memory_allocated`; on
  a CPU, PyTorch's profiler allocator accounting (`profile_memory=True`: every CPU tensor allocation and free
  carries the allocator's running total; the peak of that total above its value before the call). This
  counts live tensors, not the process RSS, and not the private scratch buffers of oneDNN/MKL.
- Out-of-memory points are rows (`OOM`), and the longer points of that series are not tried. `skip`: not
  run, because a materialised (N×N) method is past `max_n_quadratic`, or because its predicted wall time
  exceeded the preset's `point_budget_s`. `gate ✗`: the variant's output or gradients differ from the
  attention's first variant (in fp32) by more than the tolerance, so it is not reported.
- FLOPs: forward matmul FLOPs from each module's `flops()`; fwd+bwd = 3.5× forward for softmax (the
  convention of FlashAttention-2's benchmarks, Dao 2023, arXiv 2307.08691), 3× for the others. Crossovers:
  the smallest grid N from which the method is better at every larger measured N; `(≈x)` interpolates the
  ratio in log-log between the two bracketing grid points; `≤ N`: better everywhere measured; `> N`: not
  better at the largest N measured against.
"""


def n_table(
    table: OperatorTable, setting: tuple, head_dim: int, cell: Callable[[dict | None], str]
) -> list[str]:
    """A markdown table of ``cell(row)``: one line per variant that has a non-empty cell, one column per N."""
    ns = table.lengths(setting, head_dim)
    body = []
    for label in table.labels:
        cells = [cell(table.get(setting, head_dim, label, n)) for n in ns]
        if any(cells):
            body.append([f"`{label}`", *cells])
    return md_table(["method", *[f"N={n:,}" for n in ns]], body)


def operator_sections(table: OperatorTable) -> list[str]:
    lines = ["## Operator level: time and memory against N", ""]
    for setting, head_dim in table.grids():
        for metric, title in (*METRICS.items(), ("fwd_bwd_gflops", "fwd+bwd achieved GFLOP/s")):
            lines += [f"### {title}: d = {head_dim} ({setting_text(setting)})", ""]
            lines += n_table(table, setting, head_dim, lambda row, metric=metric: _cell(row, metric))
    return lines


def taylorshift_section(table: OperatorTable) -> list[str]:
    lines = [
        "## TaylorShift: efficient against direct (measured) beside N0 / N1 (theory)",
        "",
        "N0 = d² + d + 1 is the FLOP break-even, N1 the memory break-even (Nauen et al. 2024, "
        "arXiv 2403.02920; `crossover_n0`, `crossover_n1`); measured: from which N the efficient mode is "
        "faster (fwd, fwd+bwd) or needs less peak memory (fwd+bwd) than the direct mode.",
        "",
    ]
    modes = {
        r["label"]: (r.get("overrides") or {}).get("mode")
        for r in table.rows
        if r["attention"] == "taylorshift"
    }
    direct = [label for label, mode in modes.items() if mode == "direct"]
    efficient = [label for label, mode in modes.items() if mode == "efficient"]
    if not direct or not efficient:
        return lines + ["No pair of TaylorShift rows with mode=direct and mode=efficient in this run.", ""]
    header = "setting|d|efficient variant|faster (fwd)|faster (fwd+bwd)|N0 (theory)|less memory (fwd+bwd)|"
    body = []
    for setting, head_dim in table.grids():
        n0, n1 = f"{crossover_n0(head_dim):,}", f"{crossover_n1(head_dim):,}"
        for label in efficient:
            fwd, fwd_bwd, memory = table.crossover_texts(setting, head_dim, label, direct[0])
            body.append([setting_text(setting), str(head_dim), f"`{label}`", fwd, fwd_bwd, n0, memory, n1])
    return lines + md_table((header + "N1 (theory)").split("|"), body)


def softmax_section(table: OperatorTable, references: list[str]) -> list[str]:
    lines = [
        "## Where each attention overtakes softmax",
        "",
        "Measured crossover N against each softmax reference (fwd time, fwd+bwd time, fwd+bwd peak "
        "memory), and the FLOP-parity N* = F_X/(4Nd), where softmax's 4N²d forward FLOPs per head equal "
        "the method's (equal efficiency; methods whose FLOPs are linear in N).",
        "",
    ]
    for reference in references:
        if reference not in table.labels:
            lines += [f"Reference `{reference}` was not measured in this run.", ""]
            continue
        body = []
        for setting, head_dim in table.grids():
            for label in table.labels:
                if label != reference:
                    found = table.crossover_texts(setting, head_dim, label, reference)
                    parity = table.flop_parity(setting, head_dim, label)
                    where = [setting_text(setting), str(head_dim), f"`{label}`"]
                    body.append([*where, *found, f"{parity:,.0f}" if parity else "—"])
        header = ["setting", "d", "method", "fwd", "fwd+bwd", "memory", "FLOP parity N*"]
        lines += [f"### against `{reference}`", "", *md_table(header, body)]
    return lines


def model_section(rows: list[dict[str, Any]], reference: str | None) -> list[str]:
    model_rows = [row for row in rows if row["kind"] == "model"]
    if not model_rows:
        return []
    first = next((r for r in model_rows if not status_text(r)), model_rows[0])
    lines = [
        "## Model level: training steps/s and peak memory (LRA paper Table 2 layout)",
        "",
        f"Task `{first.get('task')}` (profile `{first.get('profile')}`): {first.get('n_layers')} layers, "
        f"d_model {first.get('d_model')}, {first.get('heads')} heads of {first.get('head_dim')}, mlp "
        f"{first.get('mlp_dim')}, batch {first.get('batch')}, precision {first.get('precision')}; one "
        "training step = forward, cross-entropy, backward, AdamW step (the task's optimiser). Peak "
        "memory: the step's rise above the live parameters and optimiser state. Ratios are against "
        f"`{reference}`; the LRA paper's published 4K ratios (TPU v3, batch 32, official model) are "
        "beside ours (Tay et al. 2021, arXiv 2011.04006, Table 2: its 4K column).",
        "",
    ]
    if first.get("profile") != "official":
        lines += [
            f"This is a reduced model (profile `{first.get('profile')}`), not the official Text model (4 "
            "layers, d_model 256, 4 heads of 64, mlp 1024, batch 32), which `bench=gpu` runs.",
            "",
        ]
    lengths = sorted({r["seq_len"] for r in model_rows})
    index = {(r["label"], r["seq_len"]): r for r in model_rows}

    def cell(label: str, n: int, key: str) -> str:
        row = index.get((label, n))
        if row is None:
            return ""
        if status := status_text(row):
            return status
        theirs = index.get((reference, n))
        theirs = theirs.get(key) if theirs is not None and not status_text(theirs) else None
        return fmt(row[key]) + (f" ({row[key] / theirs:.2f}×)" if theirs else "")

    body = []
    for label in dict.fromkeys(r["label"] for r in model_rows):
        attention = next(r for r in model_rows if r["label"] == label)["attention"]
        paper = published_efficiency_4k(attention) if label == attention else None
        cells = [cell(label, n, key) for key in ("steps_per_s", "peak_mb") for n in lengths]
        cells += [f"{paper[0]:.1f}×", f"{paper[1]:.2f}×"] if paper else ["", ""]
        body.append([f"`{label}`", *cells])
    header = ["method", *[f"{key} {n:,}" for key in ("steps/s", "peak MB") for n in lengths]]
    lines += md_table([*header, "paper 4K speed-up", "paper 4K memory ratio"], body)
    ts_rows = [r for r in model_rows if r["attention"] == "taylorshift" and r.get("mode_used")]
    if modes := sorted({(r["label"], r["mode_used"]) for r in ts_rows}):
        lines += [
            "TaylorShift modes that ran: " + "; ".join(f"`{label}` → {mode}" for label, mode in modes),
            "",
        ]
    return lines


def problems_section(rows: list[dict[str, Any]]) -> list[str]:
    failed = [
        r
        for r in rows
        if r.get("kind") in ("operator", "model")
        and ((r.get("error") and not r.get("oom")) or r.get("gate_ok") is False)
    ]
    if not failed:
        return []
    lines = ["## Errors and gate failures", ""]
    for row in failed:
        where = f"N={row['seq_len']}" + (
            f", d={row['head_dim']}" if row["kind"] == "operator" else " (model)"
        )
        what = row.get("error") or f"gate error {row.get('gate_err'):.2e} against `{row.get('gate_against')}`"
        lines.append(f"- `{row['label']}` at {where}: {what}")
    return lines + [""]


def plot(table: OperatorTable, out_dir: Path) -> list[Path]:
    """time_vs_n.png (fwd, fwd+bwd) and memory_vs_n.png: log-log against N, one line per variant (dashed
    where it materialises N×N), one panel per head size, for the first setting."""
    from matplotlib import colormaps, ticker
    from matplotlib.figure import Figure

    if not table.settings:
        return []
    setting = table.settings[0]
    head_dims = table.head_dims(setting)
    colours = colormaps["tab10" if len(table.labels) <= 10 else "tab20"]
    written = []
    for name, metrics in (("time_vs_n", ["fwd_ms", "fwd_bwd_ms"]), ("memory_vs_n", ["peak_mb"])):
        fig = Figure(figsize=(5.2 * len(head_dims), 3.8 * len(metrics)))
        axes = fig.subplots(len(metrics), len(head_dims), squeeze=False)
        for row_axes, metric in zip(axes, metrics, strict=True):
            for ax, head_dim in zip(row_axes, head_dims, strict=True):
                for i, label in enumerate(table.labels):
                    ns, values = table.series(setting, head_dim, label, metric)
                    points = [(n, v) for n, v in zip(ns, values, strict=True) if v and math.isfinite(v)]
                    if points:
                        linestyle = "--" if label in table.quadratic else "-"
                        ax.plot(
                            *zip(*points, strict=True),
                            color=colours(i % colours.N),
                            linestyle=linestyle,
                            marker="o",
                            markersize=3,
                            label=label,
                        )
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                lengths = table.lengths(setting, head_dim)
                ax.set_xticks(
                    lengths, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in lengths]
                )
                ax.xaxis.set_minor_locator(ticker.NullLocator())
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                ax.set(xlabel="sequence length N", ylabel=METRICS[metric], title=f"d = {head_dim}")
                ax.grid(True, which="both", alpha=0.3)
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.suptitle(f"{table.rows[0].get('device_name')}: {setting_text(setting)}", fontsize=10)
        fig.tight_layout()
        fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
        save = partial(fig.savefig, format="png", dpi=110, bbox_inches="tight")
        atomic_write(out_dir / f"{name}.png", save, binary=True)
        written.append(out_dir / f"{name}.png")
    return written


def write_report(jsonl: Path) -> Path:
    """report.md and the plots beside a rows.jsonl, from it alone; returns the report's path."""
    jsonl = Path(jsonl)
    out_dir, rows = jsonl.parent, load_rows(jsonl)
    run, end = find_row(rows, "run") or {}, find_row(rows, "run_end")
    table = OperatorTable(rows)
    references = run.get("references") or [label for label in table.labels if label.startswith("softmax")][:1]
    model_reference = (run.get("config") or {}).get("model_level", {}).get("reference") or references[0]
    plots = plot(table, out_dir)
    lines = [
        f"# Efficiency benchmark: {run.get('label', out_dir.name)}",
        "",
        f"Raw rows: [`{jsonl.name}`]({jsonl.name}) (one JSON object per measurement). Plots: "
        + ", ".join(f"[`{p.name}`]({p.name})" for p in plots)
        + ". Regenerate this file from the rows with `python -m lra.bench_report <this folder>/rows.jsonl`; "
        f"rerun the benchmark with `{rerun_command(run, out_dir)}`.",
        "",
        *environment_section(run, end, find_row(rows, "calibration")),
        METHOD_TEXT,
        *taylorshift_section(table),
        *softmax_section(table, references),
        *model_section(rows, model_reference),
        *[f"![{p.stem.replace('_', ' ')}]({p.name})" for p in plots],
        "",
        *operator_sections(table),
        *problems_section(rows),
    ]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def rerun_command(run: dict[str, Any], out_dir: Path) -> str:
    """The ``make bench`` line that repeats a run: its preset, a Hydra override wherever the recorded config
    differs from the preset as committed now, and the label and ``output_dir`` where not the defaults."""
    from omegaconf import OmegaConf

    preset = run.get("preset", "default")
    args = [f"bench={preset}"]
    preset_path = REPO_ROOT / "conf" / "bench" / f"{preset}.yaml"
    if run.get("config") and preset_path.is_file():
        committed = _flatten(OmegaConf.to_container(OmegaConf.load(preset_path)), "bench")
        recorded = _flatten(run["config"], "bench")
        args += [f"~{key}" for key in committed if key not in recorded]
        args += [
            ("" if key in committed else "+") + f"{key}={_hydra_value(value)}"
            for key, value in recorded.items()
            if key not in committed or committed[key] != value
        ]
    if run.get("label", "cpu") != device_label(run.get("device", "cpu"), run.get("device_name", "")):
        args.append(f"label={run['label']}")
    folder = Path(out_dir).resolve().parent
    if folder.is_relative_to(REPO_ROOT) and not folder.is_relative_to(REPO_ROOT / "outputs"):
        args.append(f"output_dir={folder.relative_to(REPO_ROOT)}")
    words = [arg if re.fullmatch(r"[\w.,:=+~/-]+", arg) else f"'{arg}'" for arg in args]
    return 'make bench ARGS="' + " ".join(words).replace('"', '\\"') + '"'


def _flatten(node: Any, prefix: str) -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of a nested mapping; lists are leaves, as a Hydra override replaces them whole."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    return {
        key: leaf for name, child in node.items() for key, leaf in _flatten(child, f"{prefix}.{name}").items()
    }


def _hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar."""
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_hydra_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, str):
        # A string that Hydra would read as a number, bool or null, or that holds its syntax, is quoted.
        plain = re.fullmatch(r"[A-Za-z_][\w./-]*", value) and value.lower() not in ("true", "false", "null")
        return value if plain else json.dumps(value)
    return json.dumps(value)


def report_cli(write: Callable[[Path], Path], module: str) -> None:
    """``python -m <module> <rows.jsonl>``: rewrite the report (and its plots) beside the rows."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {module} <rows.jsonl>")
    print(write(Path(sys.argv[1])))


if __name__ == "__main__":
    report_cli(write_report, "lra.bench_report")
