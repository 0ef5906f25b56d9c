"""The GPU check's report.md and plots, from its rows.jsonl alone (``lra/gpu_check.py``): the benchmark
report's operator tables, crossovers and plots, plus the fused TaylorShift kernel's targets, achieved TFLOP/s,
the numerics gate, the per-task model table, the training run's checks and the pytest outcomes.

    python -m lra.gpu_check_report results/gpu/<device>/rows.jsonl      # rewrite report.md and the plots
"""

from __future__ import annotations

import math
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from data.cache import atomic_write, atomic_write_text
from lra.bench_report import (
    environment_section,
    find_row,
    fmt,
    n_table,
    operator_sections,
    plot,
    problems_section,
    report_cli,
    softmax_section,
)
from lra.bench_rows import OperatorTable, load_rows, problem_text, setting_text
from lra.markdown import md_table

# Every file the check writes into its report folder (at most 8, so that one device call brings all back).
PLOTS = ("time_vs_n.png", "memory_vs_n.png", "model_vs_softmax.png")
OUTPUT_FILES = ("rows.jsonl", "report.md", "pytest.log", "train.log", *PLOTS)
# The fused Triton TaylorShift kernel's targets: B=1, h=8, N=16384, d=64, bf16, non-causal.
TARGET_LABEL = "taylorshift mode=efficient,impl=triton"
TARGET_D, TARGET_N = 64, 16384
TARGET_LIMITS = {"fwd_ms": (1.0, "ms"), "fwd_bwd_ms": (3.5, "ms"), "peak_mb": (150.0, "MB")}
NAMES = {"fwd_ms": "fwd", "fwd_bwd_ms": "fwd+bwd", "peak_mb": "peak (fwd+bwd)"}
# (reference label, N from which the kernel must be faster)
TARGET_CROSSOVERS = [("softmax backend=cudnn", 16384), ("softmax backend=flash", 8192)]
EARLIER_H100 = (
    "Measured earlier on an H100 for orientation, fwd / fwd+bwd / peak at N=16,384: SDPA cuDNN "
    "1.17 / 4.09 ms / 97 MB, FA2 1.92 / 6.76 ms / 129 MB, PyTorch TaylorShift efficient 4.93 / 29.7 ms / "
    "4.2 GB."
)


def targets_section(table: OperatorTable) -> list[str]:
    lines = ["## Targets: fused Triton TaylorShift, B=1, h=8, N=16,384, d=64, bf16", ""]
    if not table.settings:
        return lines + ["No operator rows: the operator stage did not run.", ""]
    # The target shape, or in a dry run the nearest that was measured.
    setting = next((s for s in table.settings if s[1:3] == (1, 8)), table.settings[0])  # B=1, h=8
    dims = table.head_dims(setting)
    head_dim = TARGET_D if TARGET_D in dims else dims[-1]
    lengths = table.lengths(setting, head_dim)
    n = TARGET_N if TARGET_N in lengths else lengths[-1]
    if (head_dim, n) != (TARGET_D, TARGET_N) or setting[0] != "bfloat16":
        where = f"{setting_text(setting)}, d={head_dim}, N={n:,}"
        lines += [f"**Not the target shape**: evaluated at {where} (a dry run).", ""]
    row = table.get(setting, head_dim, TARGET_LABEL, n)
    body = []
    for metric, (limit, unit) in TARGET_LIMITS.items():
        value = None if row is None or row.get("skipped") or row.get("error") else row.get(metric)
        if value is None:
            verdict = "not measured" + (f" ({row.get('error') or row.get('skipped')})" if row else "")
        elif value <= limit:
            verdict = f"**met**, {100 * (1 - value / limit):.0f}% under"
        else:
            verdict = f"**missed** by {100 * (value / limit - 1):.0f}% ({value / limit:.2f}× the target)"
        body.append([NAMES[metric], f"≤ {limit:g} {unit}", fmt(value), verdict])
    for reference, from_n in TARGET_CROSSOVERS:
        for metric in ("fwd_ms", "fwd_bwd_ms"):
            found = table.crossover(setting, head_dim, TARGET_LABEL, reference, metric)
            ours, theirs = (
                table.get(setting, head_dim, label, from_n) for label in (TARGET_LABEL, reference)
            )
            ratio = ""
            if ours and theirs and ours.get(metric) and theirs.get(metric):
                ratio = f"; at N={from_n:,}: {ours[metric] / theirs[metric]:.2f}× its time"
            if found.status == "unknown":
                verdict = "not measured"
            else:
                met = found.status == "always" or (found.status == "crossed" and found.n <= from_n)
                verdict = f"**{'met' if met else 'missed'}**: faster from N {found.text()}{ratio}"
            body.append([f"faster than `{reference}` ({NAMES[metric]})", f"from N = {from_n:,}", "", verdict])
    return lines + md_table(["target", "goal", "measured", "verdict"], body) + [EARLIER_H100, ""]


def tflops_section(table: OperatorTable, calibration: dict[str, Any] | None) -> list[str]:
    matmul = (calibration or {}).get("matmul_gflops")
    lines = ["## Achieved TFLOP/s (each method's own FLOPs) against the in-run matmul", ""]
    if matmul:
        lines += [
            f"In-run {calibration['matmul_n']}³ {calibration['dtype']} matmul: {matmul / 1e3:,.1f} TFLOP/s "
            f"(100%). Cells: fwd / fwd+bwd TFLOP/s (fwd+bwd as % of the matmul).",
            "",
        ]

    def cell(row: dict[str, Any] | None) -> str:
        fwd, fb = (row or {}).get("fwd_gflops"), (row or {}).get("fwd_bwd_gflops")
        pct = f" ({100 * fb / matmul:.0f}%)" if fb and matmul else ""
        return f"{fmt(fwd and fwd / 1e3)} / {fmt(fb and fb / 1e3)}{pct}" if fwd else ""

    for setting, head_dim in table.grids():
        lines += [f"d = {head_dim}, {setting_text(setting)}:", "", *n_table(table, setting, head_dim, cell)]
    return lines


def gate_section(rows: list[dict[str, Any]]) -> list[str]:
    gated = [r for r in rows if r.get("kind") == "operator" and r.get("gate_err") is not None]
    lines = ["## Numerics: output and q/k/v gradients against the attention's first variant in fp32", ""]
    if not gated:
        return lines + ["No gated rows.", ""]
    body = [
        [f"`{r['label']}`", f"{r['seq_len']:,}", f"{r['gate_err']:.2e}", str(r.get("gate_against"))]
        + ["✓" if r.get("gate_ok") else "✗"]
        for r in gated
    ]
    return lines + md_table(["method", "N", "max rel. error", "against", "ok"], body)


def _softmax_row(model_rows: list[dict[str, Any]], task: str) -> dict[str, Any] | None:
    return next((r for r in model_rows if r["task"] == task and r["label"] == "softmax"), None)


def model_section(rows: list[dict[str, Any]]) -> list[str]:
    model_rows = [r for r in rows if r.get("kind") == "model"]
    lines = ["## Model level: each task at its official size, training step (LRA Table 2 style)", ""]
    if not model_rows:
        return lines + ["No model rows: the model stage did not run.", ""]
    lines += [
        "One step = forward, cross-entropy, backward, the task's optimiser step; ratios against `softmax` "
        "(SDPA, backend auto) of the same task. Peak: the step's rise above parameters and optimiser "
        "state. tokens/s = steps/s × batch × N.",
        "",
    ]
    body = []
    for r in model_rows:
        shape = f"N={r['seq_len']:,}, B={r['batch']}, {r.get('n_layers', '?')}×{r.get('d_model', '?')}"
        if not r.get("steps_per_s"):
            body.append([r["task"], shape, f"`{r['label']}`", problem_text(r)[:120], "", ""])
            continue
        ref = _softmax_row(model_rows, r["task"])
        ref = ref if ref and ref.get("steps_per_s") else None
        speed = f" ({r['steps_per_s'] / ref['steps_per_s']:.2f}×)" if ref else ""
        memory = f" ({r['peak_mb'] / ref['peak_mb']:.2f}×)" if ref and ref.get("peak_mb") else ""
        label = f"`{r['label']}`" + (f" → {r['mode_used']}" if r.get("mode_used") else "")
        steps, tokens, peak = (
            fmt(r["steps_per_s"]) + speed,
            fmt(r.get("tokens_per_s")),
            fmt(r["peak_mb"]) + memory,
        )
        body.append([r["task"], shape, label, steps, tokens, peak])
    header = ["task", "shape", "attention", "steps/s (× softmax)", "tokens/s", "peak MB (× softmax)"]
    return lines + md_table(header, body)


def train_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Training run: train.py on the ListOps recipe, then resume", ""]
    phases = [r for r in rows if r.get("kind") == "train"]
    if not phases:
        return lines + ["The training stage did not run.", ""]
    body = []
    for r in phases:
        perf, metrics = r.get("perf") or {}, r.get("metrics") or {}
        body.append(
            [r["phase"], str(r.get("status")), str(r.get("global_step")), str(r.get("precision"))]
            + [fmt(perf.get("steps_per_s")), fmt(perf.get("tokens_per_s"))]
            + [f"{fmt(perf.get('peak_mem_gb'))} ({perf.get('peak_mem_kind')})"]
            + [fmt(metrics.get("val/acc")), fmt(metrics.get("test/acc")), f"{r['wall_s']:.0f}"]
        )
    header = ["phase", "status", "step", "precision", "steps/s", "tokens/s", "peak GB", "val acc", "test acc"]
    lines += md_table([*header, "wall s"], body)
    for c in (r for r in rows if r.get("kind") == "train_check"):
        mark = "✓" if c["ok"] else ("✗" if c.get("counts", True) else "✗ (not counted in a dry run)")
        lines.append(f"- {mark} {c['check']}: {c['detail']}")
    return lines + ["", "Full log: [`train.log`](train.log).", ""]


def pytest_section(rows: list[dict[str, Any]]) -> list[str]:
    tests = [r for r in rows if r.get("kind") == "pytest"]
    lines = ["## GPU tests (`pytest -m gpu`)", ""]
    if not tests:
        return lines + ["No test results (the stage did not run or pytest was killed).", ""]
    counts = Counter(t["outcome"] for t in tests)
    lines += [", ".join(f"{v} {k}" for k, v in counts.items()) + ". Log: [`pytest.log`](pytest.log).", ""]
    body = [
        [f"`{t['test']}`", t["outcome"], f"{t['time_s']:.1f}", (t.get("message") or "")[:160]] for t in tests
    ]
    return lines + md_table(["test", "outcome", "s", "message"], body)


def stage_section(rows: list[dict[str, Any]]) -> list[str]:
    body = [
        [r["stage"], r["status"] + (" — **out of time**, partial rows" if r.get("cut") else "")]
        + [f"{r['wall_s']:.0f}", f"{r['budget_s']:.0f}"]
        for r in rows
        if r.get("kind") == "stage"
    ]
    return ["## Stages", ""] + md_table(["stage", "status", "wall s", "budget s"], body)


def model_plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """model_vs_softmax.png: steps/s and peak memory relative to softmax, one group of bars per task."""
    from matplotlib import ticker
    from matplotlib.figure import Figure

    model_rows = [r for r in rows if r.get("kind") == "model" and r.get("steps_per_s")]
    tasks = list(dict.fromkeys(r["task"] for r in model_rows))
    labels = list(dict.fromkeys(r["label"] for r in model_rows))
    if not tasks:
        return []
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2)
    width = 0.8 / len(labels)
    for ax, key, title in zip(axes, ("steps_per_s", "peak_mb"), ("steps/s", "peak memory"), strict=True):
        for i, label in enumerate(labels):
            ratios = []
            for task in tasks:
                ours = next((r for r in model_rows if r["task"] == task and r["label"] == label), None)
                ref = _softmax_row(model_rows, task)
                ok = ours and ref and ours.get(key) and ref.get(key)
                ratios.append(ours[key] / ref[key] if ok else math.nan)
            ax.bar([t + i * width for t in range(len(tasks))], ratios, width, label=label)
        ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{title} relative to softmax (log scale)")
    axes[1].legend(fontsize=8, frameon=False)
    device = model_rows[0].get("device_name")
    fig.suptitle(f"{device}: model level, each task at its official size", fontsize=10)
    fig.tight_layout()
    atomic_write(out_dir / "model_vs_softmax.png", partial(fig.savefig, format="png", dpi=100), binary=True)
    return [out_dir / "model_vs_softmax.png"]


def write_report(jsonl: Path) -> Path:
    """report.md and the plots beside a check's rows.jsonl, from it alone; returns the report's path."""
    jsonl = Path(jsonl)
    out_dir, rows = jsonl.parent, load_rows(jsonl)
    run, end = find_row(rows, "run") or {}, find_row(rows, "run_end")
    calibration = find_row(rows, "calibration")
    table = OperatorTable(rows)
    plots = plot(table, out_dir) + model_plot(rows, out_dir)
    lines = [f"# GPU check: {run.get('device_name', out_dir.name)}", ""]
    if run.get("dry_run"):
        lines += ["**Dry run** on a CPU at tiny sizes: it checks the script, not the GPU.", ""]
    lines += [
        f"Written by `python -m lra.gpu_check` from [`{jsonl.name}`]({jsonl.name}); regenerate with "
        f"`python -m lra.gpu_check_report {jsonl.name}`. "
        f"Wall time {(end or {}).get('wall_s', 0) / 60:.1f} min.",
        "",
        *stage_section(rows),
        *targets_section(table),
        *environment_section(run, end, calibration),
        *softmax_section(table, run.get("references") or []),
        *tflops_section(table, calibration),
        *gate_section(rows),
        *model_section(rows),
        *train_section(rows),
        *pytest_section(rows),
        *[f"![{p.stem.replace('_', ' ')}]({p.name})" for p in plots],
        "",
        *operator_sections(table),
        *problems_section(rows),
    ]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


if __name__ == "__main__":
    report_cli(write_report, "lra.gpu_check_report")
