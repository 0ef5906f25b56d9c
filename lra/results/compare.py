"""``python -m lra.results --runs DIR --compare``: a few runs side by side on stdout.

Per task, recipe and device, one row per attention (mean ± std over seeds), then the chance and the test set's
majority-class rates, so a small comparison says whether either attention learned anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pandas as pd

from lra.registry import attention_rank
from lra.results.curves import MAJORITY_APPROX, NUM_CLASSES, recorded_majority
from lra.results.runs import Run, recipe_label, task_rank


def majority_rate(task: str, data: dict[str, Any]) -> tuple[float | None, str]:
    """The test split's majority-class share and where it comes from: the run's recorded class counts, else
    the task's official data (approximate)."""
    recorded = recorded_majority(data, "test")
    if recorded is not None:
        return recorded[0], f"this run's test set ({recorded[1]} examples)"
    if task in MAJORITY_APPROX:
        return MAJORITY_APPROX[task], "approximate: the official test set's"
    return None, "unknown"


def _stat(values: pd.Series, scale: float = 1.0, pattern: str = ".2f") -> str:
    """Mean ± sample std (n - 1) of the values present; only the mean for one value."""
    present = scale * values.dropna().astype(float)
    if present.empty:
        return "—"
    mean = format(present.mean(), pattern)
    return mean if len(present) < 2 else f"{mean} ± {format(present.std(), pattern)}"


def _row(attention: str, variant: str, group: pd.DataFrame) -> tuple[str, ...]:
    done, failed = group[group.completed], group[~group.completed]
    kinds = sorted(set(done.peak_mem_kind) - {""})
    return (
        attention,
        ",".join(map(str, sorted(done.seed))) or "—",
        variant,
        _stat(done.test_acc, 100),
        _stat(done.val_acc_best, 100),
        _stat(done.steps_per_s, pattern=".3g"),
        _stat(done.summary.map(lambda summary: summary.get("wall_time_s")), pattern=".0f"),
        _stat(done.peak_mem_gb) + (f" ({'/'.join(kinds)})" if kinds else ""),
        f"{len(failed)} failed: {failed.status.iloc[0][:60]}" if len(failed) else "",
    )


# Within this many points of the majority-class rate, a model has most likely learned to predict one class.
NOT_LEARNING_MARGIN = 0.01


def _verdicts(block: pd.DataFrame, majority: float | None) -> list[str]:
    """A line per attention whose mean test accuracy is no better than always answering the majority class."""
    if majority is None:
        return []
    means = (
        block[block.completed].dropna(subset=["test_acc"]).groupby("attention", sort=False).test_acc.mean()
    )
    return [
        f"note: {attention} is at the majority-class rate ({100 * mean:.2f}% test): it has "
        "not learned this task at this recipe and budget (results/analyses.md explains why TaylorShift lags "
        "on ListOps)"
        for attention, mean in means.items()
        if mean <= majority + NOT_LEARNING_MARGIN
    ]


HEADER = ("attention", "seeds", "config", "test acc %", "best val acc %", "steps/s", "wall s", "peak mem GB")


def render_comparison(runs: list[Run]) -> str:
    """One block per (task, recipe, device) of local runs (each with its summary.json in ``run.folder``)."""
    if not runs:
        return "No summary.json found.\n"
    frame = pd.DataFrame(
        [
            asdict(run)
            | {"completed": run.completed, "summary": json.loads((run.folder / "summary.json").read_text())}
            for run in runs
        ]
    )
    blocks = sorted(
        frame.groupby(["task", "profile", "device"]), key=lambda item: (task_rank(item[0][0]), item[0])
    )
    lines: list[str] = []
    for (task, profile, device), block in blocks:
        by_config = sorted(
            block.groupby(["attention", "variant"]), key=lambda item: (attention_rank(item[0][0]), item[0])
        )
        rows = [
            (*HEADER, ""),
            *(_row(attention, variant, group) for (attention, variant), group in by_config),
        ]
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
        lines += [f"{task} · {recipe_label(profile)} · {device}"]
        lines += [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        data = block.summary.iloc[0].get("data") or {}
        classes = data.get("num_classes") or NUM_CLASSES.get(task)
        rates = [f"chance (1/{classes} classes) {100 / classes:.2f}%"] if classes else []
        majority, origin = majority_rate(task, data)
        if majority is not None:
            rates.append(f"majority class {100 * majority:.2f}% ({origin})")
        lines += ["  ".join(["rates:", *rates]) if rates else "rates: unknown for this task"]
        lines += _verdicts(block, majority)
        lines += [""]
    return "\n".join(lines)
