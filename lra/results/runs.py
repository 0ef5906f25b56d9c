"""A Run: one training run as read from its ``summary.json`` (written by train.py) or from W&B; where runs
come from; and ``collect_runs``, which copies a sweep's summaries into the layout of results/runs/."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from lra.registry import attention_rank
from lra.results.curves import CURVE_FILE, read_curve, recorded_majority, slug, write_curve
from lra.summary import REPO_ROOT, recorded_model

LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
# The config nodes that change what is trained; paths, loggers, callbacks and the seed do not.
RECIPE_NODES = ("model", "data", "optim", "scheduler", "trainer", "eval")
NOT_RECIPE_KEYS = {
    "data": {"data_dir", "data_root", "num_workers", "seed", "cache_dir"},
    "trainer": {"default_root_dir", "enable_progress_bar", "log_every_n_steps"},
}
# Never written out: a clone resets file times and paths.
UNPUBLISHED_FIELDS = ("timestamp", "val_majority", "folder")


@dataclass(frozen=True)
class Run:
    """One training run. Accuracies are fractions (0-1)."""

    task: str
    attention: str
    profile: str
    device: str
    seed: int
    status: str
    variant: str  # recipe_variant(config): runs of different variants never share a table cell
    test_acc: float | None = None
    val_acc_best: float | None = None
    steps_per_s: float | None = None
    peak_mem_gb: float | None = None
    peak_mem_kind: str = ""
    commit: str = "unknown"
    data_source: str = ""
    command: str = ""
    source: str = ""
    timestamp: float = 0.0  # when the run finished; only chooses between duplicates of one run
    val_majority: float | None = None  # majority-class share of the scored validation examples
    folder: Path | None = None  # a local run's folder, where its learning curve is

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def recipe_label(profile: str) -> str:
    return {"official": "official", "cpu": "reduced (profile=cpu)"}.get(profile, f"profile={profile}")


def short_commit(commit: str) -> str:
    sha, dirty, _ = commit.partition("-dirty")
    return sha[:7] + ("-dirty" if dirty else "")


def recipe_variant(config: dict[str, Any] | None) -> str:
    """Short hash of the settings that change what is trained (RECIPE_NODES); "unknown" without a config."""
    if not config:
        return "unknown"
    # The model node in its recorded layout, so that a recipe keeps its hash (and committed runs their cells).
    chosen = {node: recorded_model(config) if node == "model" else config.get(node) for node in RECIPE_NODES}
    for node, ignored in NOT_RECIPE_KEYS.items():
        if isinstance(chosen[node], dict):
            chosen[node] = {key: value for key, value in chosen[node].items() if key not in ignored}
    return hashlib.sha1(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:8]


def task_rank(task: str) -> int:
    """LRA order; other tasks after the LRA ones."""
    return LRA_TASKS.index(task) if task in LRA_TASKS else len(LRA_TASKS)


def listing_order(run: Run) -> tuple:
    """Official recipe first, then recipe, device, task, attention, seed."""
    where = (run.profile != "official", run.profile, run.device)
    return (*where, task_rank(run.task), run.task, attention_rank(run.attention), run.attention, run.seed)


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _command(task: str, attention: str, profile: str, seed: int, overrides: list[str] | None) -> str:
    if overrides is None:
        return f"python train.py task={task} attention={attention} profile={profile} seed={seed}"
    kept = [item for item in overrides if not item.startswith(("hydra.", "+hydra.", "hydra/"))]
    keys = {item.split("=", 1)[0].lstrip("+~") for item in kept}
    # train.py adds profile=cpu itself without CUDA; spell it out so the command reproduces the run.
    kept += [f"{key}={value}" for key, value in (("profile", profile), ("seed", seed)) if key not in keys]
    return "python train.py " + " ".join(kept)


def _read_overrides(summary_path: Path) -> list[str] | None:
    """.hydra/overrides.yaml in a run dir, overrides.yaml in results/runs/."""
    for candidate in (
        summary_path.parent / ".hydra" / "overrides.yaml",
        summary_path.parent / "overrides.yaml",
    ):
        if candidate.is_file():
            return [str(item) for item in yaml.safe_load(candidate.read_text()) or []]
    return None


def run_from_summary(
    summary: dict[str, Any],
    source: str = "",
    timestamp: float = 0.0,
    overrides: list[str] | None = None,
    folder: Path | None = None,
) -> Run:
    metrics, perf, data = summary.get("metrics") or {}, summary.get("perf") or {}, summary.get("data") or {}
    config = summary.get("config")
    task, attention, profile = summary["task"], summary["attention"], summary.get("profile") or "unknown"
    seed = int(summary.get("seed", config.get("seed", 0) if config else 0))
    test_acc = _float(metrics.get("test/acc"))
    status = str(summary.get("status", "unknown"))
    if status == "completed" and test_acc is None:  # cannot be averaged: listed with the failures
        status = "completed without test/acc"
    return Run(
        task=task,
        attention=attention,
        profile=profile,
        device=summary.get("device") or "unknown",
        seed=seed,
        status=status,
        variant=recipe_variant(config),
        test_acc=test_acc,
        val_acc_best=_float(metrics.get("val/acc_best")),
        steps_per_s=_float(perf.get("steps_per_s", metrics.get("perf/steps_per_s"))),
        peak_mem_gb=_float(perf.get("peak_mem_gb", metrics.get("perf/peak_mem_gb"))),
        peak_mem_kind=str(perf.get("peak_mem_kind", "")),
        commit=summary.get("git_commit") or "unknown",
        data_source=str(data.get("source", "")),
        command=_command(task, attention, profile, seed, overrides),
        source=source,
        timestamp=timestamp,
        val_majority=(recorded_majority(data, "val") or (None,))[0],
        folder=folder,
    )


def display_path(path: Path) -> str:
    """``path`` relative to the working directory or the repository when under either, else absolute."""
    resolved = path.resolve()
    for base in (Path.cwd(), REPO_ROOT):
        if resolved.is_relative_to(base):
            return str(resolved.relative_to(base))
    return str(resolved)


def read_run(path: Path, **fields: Any) -> tuple[dict[str, Any], Run]:
    """A summary.json and its Run, timestamped by its ``finished_at`` (ISO 8601), else by the file's mtime."""
    summary = json.loads(path.read_text())
    try:
        stamp = datetime.fromisoformat(summary["finished_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        stamp = path.stat().st_mtime
    return summary, run_from_summary(summary, timestamp=stamp, **fields)


def load_local_runs(roots: Sequence[Path]) -> tuple[list[Run], list[str]]:
    """A Run per ``summary.json`` under ``roots``; unreadable ones as problems."""
    runs, problems = [], []
    for path in (path for root in roots for path in sorted(root.rglob("summary.json"))):
        try:
            fields = {"source": display_path(path), "overrides": _read_overrides(path), "folder": path.parent}
            runs.append(read_run(path, **fields)[1])
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append(f"{display_path(path)}: unreadable summary ({type(error).__name__}: {error})")
    return runs, problems


def run_from_wandb(run: Any) -> Run:
    """A Run from a ``wandb.Api()`` run: its config (train.py's resolved config) and summary metrics."""
    config, state = dict(run.config), getattr(run, "state", "unknown")
    # A W&B sweep locks the keys it sets (attention, task, seed) to the plain strings it passed.
    task = config["task"]["name"] if isinstance(config.get("task"), dict) else str(config.get("task"))
    summary = {
        "task": task,
        "attention": str(config.get("attention_name") or config.get("attention")),
        "profile": str(config.get("profile") or "unknown"),
        "device": str(config.get("device") or "unknown"),
        "seed": int(config.get("seed", 0)),
        "status": "completed" if state == "finished" else f"wandb state: {state}",
        "git_commit": str(config.get("git_commit") or "unknown"),
        "config": config,
        "metrics": dict(run.summary),
    }
    return run_from_summary(
        summary, source=str(getattr(run, "url", "") or f"wandb:{getattr(run, 'path', '')}")
    )


def load_wandb_runs(project: str) -> tuple[list[Run], list[str]]:
    """Runs of ``ENTITY/PROJECT``; an unreachable API is a message, not a crash."""
    try:
        import wandb

        api_runs = list(wandb.Api(timeout=30).runs(project))
    except Exception as error:
        message = (
            f"W&B: could not read runs of {project!r} ({type(error).__name__}: {error}); "
            "continuing with the local summary.json files only"
        )
        print(message, file=sys.stderr)
        return [], [message]
    runs, problems = [], []
    for api_run in api_runs:
        try:
            runs.append(run_from_wandb(api_run))
        except (KeyError, TypeError, ValueError) as error:
            problems.append(
                f"W&B run {getattr(api_run, 'path', '?')}: skipped ({type(error).__name__}: {error})"
            )
    return runs, problems


def _preference(run: Run) -> tuple:
    # Completed beats failed, then the newest run, then local files over W&B (they carry more detail).
    return (run.completed, run.timestamp, not run.source.startswith(("http", "wandb:")), run.source)


def deduplicate(runs: Iterable[Run]) -> tuple[list[Run], list[Run]]:
    """One run per (recipe, device, task, attention, variant, seed); returns (kept, superseded)."""
    by_key: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_key[(run.profile, run.device, run.task, run.attention, run.variant, run.seed)].append(run)
    kept, superseded = [], []
    for group in by_key.values():
        best_first = sorted(group, key=_preference, reverse=True)
        kept.append(best_first[0])
        superseded.extend(best_first[1:])
    return kept, superseded


def collect_runs(sweep_dir: Path, runs_dir: Path) -> list[Path]:
    """Copy each summary.json under ``sweep_dir`` (with its Hydra overrides and learning curve) to
    ``<runs_dir>/<profile>/<device>/<task>/<attention>/seed<k>-<variant>/``; returns the summaries written.

    A folder already there is replaced by a completed run, or by a newer one when neither completed: a later
    crash never erases a result.
    """
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"--collect {sweep_dir}: no such folder; pass a Hydra sweep or run directory")
    copied = []
    for path in sorted(sweep_dir.rglob("summary.json")):
        summary, run = read_run(path)
        target = runs_dir / slug(run.profile) / slug(run.device) / run.task / run.attention
        target /= f"seed{run.seed}-{run.variant}"
        existing = target / "summary.json"
        if existing.is_file() and (
            existing.resolve() == path.resolve() or _preference(read_run(existing)[1]) > _preference(run)
        ):
            continue
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, existing)  # copy2 keeps the mtime, which decides between duplicates later
        overrides = path.parent / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            shutil.copy2(overrides, target / "overrides.yaml")
        # The learning curve, compact, so the figures regenerate without the run's logs.
        curve = read_curve(path.parent, summary)
        if curve is not None:
            write_curve(curve, target / CURVE_FILE)
        else:
            (target / CURVE_FILE).unlink(missing_ok=True)
        copied.append(existing)
    return copied
