"""Learning curves: validation accuracy against training step and time, one figure per task.

A run's curve comes from its CSVLogger file ``<run dir>/csv/metrics.csv``; ``--collect`` stores it compactly
as ``curve.csv`` beside the committed ``summary.json``, so the figures regenerate from the repository alone.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from data.cache import atomic_write
from lra.registry import registered_attentions

if TYPE_CHECKING:
    from lra.results.cells import Report

CURVE_FILE = "curve.csv"
CURVE_COLUMNS = ["step", "val_acc", "train_loss", "elapsed_s"]
# Seconds since training started, validation included; without it, steps × the mean step time.
WALL_CLOCK_COLUMNS = ("time/elapsed_s", "perf/elapsed_s")
NUM_CLASSES = {"listops": 10, "text": 2, "retrieval": 2, "image": 10, "pathfinder": 2, "pathx": 2}
# Majority-class share of each official test set, for runs that recorded no class counts: ListOps (Tay et
# al. 2021, arXiv 2011.04006) has classes 0 and 9 at about 17% each; the others are balanced.
MAJORITY_APPROX = {task: 1 / classes for task, classes in NUM_CLASSES.items()} | {"listops": 0.17}


def recorded_majority(data: dict[str, Any], split: str) -> tuple[float, int] | None:
    """(majority-class share, examples) of ``split`` from ``data.class_counts`` (a list or a {label: count}
    dict), or None when the run did not record them."""
    counts = (data.get("class_counts") or {}).get(split)
    if isinstance(counts, dict):
        counts = list(counts.values())
    return (max(counts) / sum(counts), sum(counts)) if counts and sum(counts) > 0 else None


def curve_from_metrics(metrics_csv: Path, step_ms: float | None = None) -> pd.DataFrame | None:
    """One row per validation (CURVE_COLUMNS), or None without any; ``step_ms`` (summary.json's mean step
    time) stands in where the CSV logged no ``perf/step_ms``."""
    log = pd.read_csv(metrics_csv)
    if "val/acc" not in log or "step" not in log:
        return None
    # Lightning logs at the index of the batch being finished, before counting it: steps trained = step + 1.
    log["step"] = log["step"].astype(int) + 1
    val = log.dropna(subset=["val/acc"]).drop_duplicates("step", keep="last")[["step", "val/acc"]]
    if val.empty:
        return None
    curve = val.rename(columns={"val/acc": "val_acc"}).sort_values("step").reset_index(drop=True)
    curve["train_loss"] = _last_at_or_before(log, "train/loss", curve["step"])
    wall = next((column for column in WALL_CLOCK_COLUMNS if column in log), None)
    if wall is not None:
        curve["elapsed_s"] = _last_at_or_before(log, wall, curve["step"])
    else:
        # perf/step_ms is the running mean over the steps timed so far; fall back to the run's mean.
        mean_ms = _last_at_or_before(log, "perf/step_ms", curve["step"]).fillna(step_ms or float("nan"))
        curve["elapsed_s"] = curve["step"] * mean_ms / 1000
    return curve[CURVE_COLUMNS]


def _last_at_or_before(log: pd.DataFrame, column: str, steps: pd.Series) -> pd.Series:
    if column not in log:
        return pd.Series(float("nan"), index=steps.index)
    values = log.dropna(subset=[column]).sort_values("step", kind="stable")[["step", column]]
    merged = pd.merge_asof(steps.to_frame("step"), values.drop_duplicates("step", keep="last"), on="step")
    return merged[column]


def read_curve(run_dir: Path, summary: dict[str, Any] | None = None) -> pd.DataFrame | None:
    """A stored ``curve.csv``, else one derived from ``csv/metrics.csv``, else None."""
    stored, metrics = run_dir / CURVE_FILE, run_dir / "csv" / "metrics.csv"
    step_ms = ((summary or {}).get("perf") or {}).get("step_ms")
    # A damaged file leaves the run out of the figures rather than failing the whole table.
    try:
        if stored.is_file():
            curve = pd.read_csv(stored)
            return curve if set(CURVE_COLUMNS) <= set(curve.columns) and len(curve) else None
        return curve_from_metrics(metrics, step_ms) if metrics.is_file() else None
    except (ValueError, KeyError, pd.errors.ParserError):
        return None


def write_curve(curve: pd.DataFrame, path: Path) -> None:
    # Six significant digits and "\n" line ends: the same run always gives the same bytes.
    curve.to_csv(path, index=False, float_format="%.6g", lineterminator="\n")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def plot_task(
    curves: dict[str, list[pd.DataFrame]],
    title: str,
    task: str,
    path: Path,
    majority: float | None = None,
) -> None:
    """Mean val accuracy over seeds per attention with a min-max band, against step and against time.
    ``majority`` (of the scored validation examples) None draws the approximate official rate."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), dpi=100)
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    colours, order = colormaps["tab10"].colors, registered_attentions()
    rate = MAJORITY_APPROX.get(task) if majority is None else majority
    rate_label = "majority class (approx.)" if majority is None else "majority class"
    for attention, runs in curves.items():
        seeds = pd.concat(runs, keys=range(len(runs)), names=["seed"]).reset_index(level=0)
        stats = seeds.groupby("step").agg(
            mean=("val_acc", "mean"),
            low=("val_acc", "min"),
            high=("val_acc", "max"),
            elapsed=("elapsed_s", "mean"),
        )
        stats[["mean", "low", "high"]] *= 100
        colour = colours[order.index(attention) % len(colours)] if attention in order else "black"
        label = f"{attention} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        for axis, x in ((by_step, stats.index), (by_time, stats["elapsed"])):
            axis.plot(x, stats["mean"], color=colour, label=label, linewidth=1.5)
            if len(runs) > 1:
                axis.fill_between(x, stats["low"], stats["high"], color=colour, alpha=0.2, linewidth=0)
    for axis in (by_step, by_time):
        axis.grid(alpha=0.3)
        if task in NUM_CLASSES:
            axis.axhline(100 / NUM_CLASSES[task], color="grey", linestyle="--", linewidth=1, label="chance")
        if rate is not None and rate * NUM_CLASSES.get(task, 0) > 1.001:  # only a rate above chance
            axis.axhline(100 * rate, color="grey", linestyle=":", linewidth=1, label=rate_label)
    by_step.set_xlabel("training step")
    by_time.set_xlabel("seconds since training started (wall clock)")
    by_step.set_ylabel("validation accuracy %")
    by_step.legend(loc="best", fontsize=8)
    figure.suptitle(f"{task}: {title} (line: mean over seeds, band: min–max)", fontsize=10)
    figure.tight_layout()
    # No "Software" entry: the PNG bytes then depend only on the data and the matplotlib version.
    atomic_write(path, partial(figure.savefig, format="png", metadata={"Software": None}), binary=True)


def write_figures(report: Report, out_dir: Path) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """One PNG per (recipe, device, task) under ``out_dir/curves`` from the main config's completed runs;
    stale PNGs there are removed. Returns the links per (profile, device)."""
    folder, links, written = out_dir / "curves", {}, set()
    for section in report.sections:
        for task in dict.fromkeys(cell.task for cell in section.cells):
            curves, majority = {}, None
            for cell in section.cells:
                if cell.task != task or not cell.main_variant:
                    continue
                run_dirs = [run.folder for run in sorted(cell.runs, key=lambda run: run.seed) if run.folder]
                found = [curve for run_dir in run_dirs if (curve := read_curve(run_dir)) is not None]
                if found:
                    curves[cell.attention] = found
                majority = next((run.val_majority for run in cell.runs if run.val_majority), majority)
            if not curves:
                continue
            path = folder / f"{'_'.join(map(slug, (section.profile, section.device, task)))}.png"
            plot_task(curves, f"{section.recipe}, {section.device}", task, path, majority)
            written.add(path)
            links.setdefault((section.profile, section.device), []).append((task, f"curves/{path.name}"))
    for stale in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if stale not in written:
            stale.unlink()
    return links
