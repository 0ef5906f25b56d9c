"""A side-by-side printout of a few runs (``python -m lra.results --runs DIR --compare``), stdout only.

Per task, recipe and device: one row per attention (test accuracy, best validation accuracy, steps/s, wall
time, peak memory; mean ± std over seeds), then the chance rate and the test set's majority-class rate, so a
small comparison says whether either attention learned anything.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lra.registry import attention_rank
from lra.results import LRA_TASKS, Run, _display_path, recipe_label, run_from_summary
from lra.results.curves import MAJORITY_APPROX, NUM_CLASSES, recorded_majority


def majority_rate(task: str, data: dict[str, Any]) -> tuple[float | None, str]:
    """The test split's majority-class share and where it comes from.

    Exact when the run's summary recorded ``data.class_counts.test`` (a list or a {label: count} dict);
    otherwise the documented value for the task's official data, labelled approximate.
    """
    recorded = recorded_majority(data, "test")
    if recorded is not None:
        return recorded[0], f"this run's test set ({recorded[1]} examples)"
    if task in MAJORITY_APPROX:
        return MAJORITY_APPROX[task], "approximate: the official test set's, per the spec"
    return None, "unknown"


def _stat(values: Sequence[float | None], scale: float = 1.0, pattern: str = ".2f") -> str:
    present = [scale * value for value in values if value is not None]
    if not present:
        return "—"
    mean = format(statistics.fmean(present), pattern)
    return mean if len(present) < 2 else f"{mean} ± {format(statistics.stdev(present), pattern)}"


def _rows(runs: list[tuple[Run, dict[str, Any]]]) -> list[tuple[str, ...]]:
    by_attention: dict[tuple[str, str], list[tuple[Run, dict[str, Any]]]] = defaultdict(list)
    for run, summary in runs:
        by_attention[(run.attention, run.variant)].append((run, summary))
    ordered = sorted(
        by_attention,
        key=lambda key: (attention_rank(key[0]), key),
    )
    rows = []
    for attention, variant in ordered:
        group = by_attention[(attention, variant)]
        done = [(run, summary) for run, summary in group if run.completed]
        seeds = ",".join(str(run.seed) for run, _ in sorted(done, key=lambda item: item[0].seed))
        failed = [run for run, _ in group if not run.completed]
        note = f"{len(failed)} failed: {failed[0].status[:60]}" if failed else ""
        kinds = sorted({run.peak_mem_kind for run, _ in done if run.peak_mem_kind})
        rows.append(
            (
                attention,
                seeds or "—",
                variant,
                _stat([run.test_acc for run, _ in done], 100),
                _stat([run.val_acc_best for run, _ in done], 100),
                _stat([run.steps_per_s for run, _ in done], pattern=".3g"),
                _stat([summary.get("wall_time_s") for _, summary in done], pattern=".0f"),
                _stat([run.peak_mem_gb for run, _ in done]) + (f" ({'/'.join(kinds)})" if kinds else ""),
                note,
            )
        )
    return rows


# Within this many points of the majority-class rate, a model has most likely learned to predict one class.
NOT_LEARNING_MARGIN = 0.01


def _verdicts(group: list[tuple[Run, dict[str, Any]]], majority: float | None) -> list[str]:
    """One line per attention whose mean test accuracy is no better than always answering the majority
    class, so a lagging attention is said in words, not left to the reader to spot in the table."""
    if majority is None:
        return []
    by_attention: dict[str, list[float]] = defaultdict(list)
    for run, _ in group:
        if run.completed and run.test_acc is not None:
            by_attention[run.attention].append(run.test_acc)
    return [
        f"note: {attention} is at the majority-class rate ({100 * statistics.fmean(accs):.2f}% test): it has "
        "not learned this task at this recipe and budget (results/analyses.md explains why TaylorShift lags "
        "on ListOps)"
        for attention, accs in by_attention.items()
        if statistics.fmean(accs) <= majority + NOT_LEARNING_MARGIN
    ]


HEADER = (
    "attention",
    "seeds",
    "config",
    "test acc %",
    "best val acc %",
    "steps/s",
    "wall s",
    "peak mem GB",
    "",
)


def render_comparison(runs: list[tuple[Run, dict[str, Any]]]) -> str:
    """The printout for (run, summary) pairs: one block per (task, recipe, device)."""
    if not runs:
        return "No summary.json found.\n"
    blocks: dict[tuple[str, str, str], list[tuple[Run, dict[str, Any]]]] = defaultdict(list)
    for run, summary in runs:
        blocks[(run.task, run.profile, run.device)].append((run, summary))
    task_rank = {task: index for index, task in enumerate(LRA_TASKS)}
    lines: list[str] = []
    for task, profile, device in sorted(blocks, key=lambda key: (task_rank.get(key[0], 99), key)):
        group = blocks[(task, profile, device)]
        rows = [HEADER, *_rows(group)]
        widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
        lines += [f"{task} · {recipe_label(profile)} · {device}"]
        lines += [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        data = group[0][1].get("data") or {}
        classes = data.get("num_classes") or NUM_CLASSES.get(task)
        rates = [f"chance (1/{classes} classes) {100 / classes:.2f}%"] if classes else []
        majority, origin = majority_rate(task, data)
        if majority is not None:
            rates.append(f"majority class {100 * majority:.2f}% ({origin})")
        lines += ["  ".join(["rates:", *rates]) if rates else "rates: unknown for this task"]
        lines += _verdicts(group, majority)
        lines += [""]
    return "\n".join(lines)


def load_with_summaries(roots: Sequence[Path]) -> tuple[list[tuple[Run, dict[str, Any]]], list[str]]:
    """(Run, summary dict) for every readable ``summary.json`` under ``roots``; problems as messages."""
    pairs, problems = [], []
    for root in roots:
        for path in sorted(root.rglob("summary.json")):
            try:
                summary = json.loads(path.read_text())
                pairs.append((run_from_summary(summary, _display_path(path)), summary))
            except (OSError, ValueError, KeyError, TypeError) as error:
                problems.append(
                    f"{_display_path(path)}: unreadable summary ({type(error).__name__}: {error})"
                )
    return pairs, problems
