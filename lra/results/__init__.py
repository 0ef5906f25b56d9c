"""Aggregate LRA runs into results/lra.md (plus lra.csv, lra.json and a provenance README.md).

python -m lra.results --out results                   # rebuild results/ from results/runs/ (make results)
python -m lra.results --runs outputs multirun         # your own runs: tables in outputs/results/
python -m lra.results --runs multirun/<dir> --compare # print a few runs side by side; writes nothing
python -m lra.results --collect multirun/results-cpu  # first copy a sweep's summaries into results/runs/
python -m lra.results --wandb-project ENTITY/PROJECT  # add W&B runs when the API is reachable

Without --out, the tables go to results/ only when the runs read are exactly the committed results/runs;
any other runs are scratch work and go to outputs/results/.

One table per (recipe, device): runs from different recipes or hardware never share a cell. A cell is
(task, attention, recipe variant): the variant is a hash of the settings that change what is trained (model,
data, optimiser, schedule, trainer, evaluation), so a run with extra overrides never joins the plain recipe.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import shutil
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from data.cache import atomic_write_text
from lra.registry import attention_rank, ordered, published_accuracy, published_source, registered_attentions
from lra.results.curves import CURVE_FILE, read_curve, recorded_majority, write_curve

REPO_ROOT = Path(__file__).resolve().parents[2]
# Only committed runs by default, so a developer's scratch runs never leak into the published table;
# pass --runs outputs multirun to include them.
DEFAULT_RUN_ROOTS = ("results/runs",)
LRA_TASKS = ("listops", "text", "retrieval", "image", "pathfinder", "pathx")
# The LRA average leaves Path-X out (every model in the paper FAILs it); ours follows the paper.
AVERAGE_EXCLUDES = ("pathx",)
MISSING = "—"
NO_STD = "–"

# The config nodes that change what is trained; paths, loggers, callbacks and the seed do not.
RECIPE_NODES = ("model", "data", "optim", "scheduler", "trainer", "eval")
NOT_RECIPE_KEYS = {
    "data": {"data_dir", "data_root", "num_workers", "seed", "cache_dir"},
    "trainer": {"default_root_dir", "enable_progress_bar", "log_every_n_steps"},
}


@dataclass(frozen=True)
class Run:
    """One training run, read from a summary.json or a W&B run. Accuracies are fractions (0-1)."""

    task: str
    attention: str
    profile: str
    device: str
    seed: int
    status: str
    variant: str
    test_acc: float | None = None
    val_acc_best: float | None = None
    steps_per_s: float | None = None
    peak_mem_gb: float | None = None
    peak_mem_kind: str = ""
    commit: str = "unknown"
    data_source: str = ""
    command: str = ""
    source: str = ""
    # When the run finished: summary.json's own `finished_at` when it has one, else the file's mtime. It
    # only chooses between duplicates of one run and is never written out (a clone resets mtimes).
    timestamp: float = 0.0
    # Majority-class share of the validation examples the run scored (summary's class counts), for the
    # learning-curve figures; like timestamp, never written out.
    val_majority: float | None = None

    @property
    def completed(self) -> bool:
        return self.status == "completed"


@dataclass
class Cell:
    """Test accuracy and cost of one (task, attention, variant) within a (recipe, device) section."""

    task: str
    attention: str
    variant: str = ""
    main_variant: bool = True
    runs: list[Run] = field(default_factory=list)
    failed: list[Run] = field(default_factory=list)
    steps_vs_softmax: float | None = None
    mem_vs_softmax: float | None = None

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def acc_mean(self) -> float | None:
        return 100 * statistics.fmean(run.test_acc for run in self.runs) if self.runs else None

    @property
    def acc_std(self) -> float | None:
        """Sample standard deviation (n - 1) over seeds in %; None for fewer than two seeds."""
        return 100 * statistics.stdev(run.test_acc for run in self.runs) if self.n >= 2 else None

    @property
    def steps_per_s(self) -> float | None:
        return _mean(run.steps_per_s for run in self.runs)

    @property
    def peak_mem_gb(self) -> float | None:
        return _mean(run.peak_mem_gb for run in self.runs)

    @property
    def peak_mem_kind(self) -> str:
        return "/".join(sorted({run.peak_mem_kind for run in self.runs if run.peak_mem_kind}))

    @property
    def published(self) -> float | str:
        return published_accuracy(self.attention, self.task)

    @property
    def delta(self) -> float | None:
        published = self.published
        if self.acc_mean is None or not isinstance(published, float):
            return None
        return self.acc_mean - published

    @property
    def commits(self) -> str:
        return ", ".join(sorted({short_commit(run.commit) for run in self.runs + self.failed}))

    @property
    def data_sources(self) -> str:
        return "+".join(sorted({run.data_source for run in self.runs if run.data_source}))


@dataclass
class Average:
    """Mean test accuracy of one attention over the tasks it has results for (main variants only)."""

    attention: str
    tasks: list[str]
    acc_mean: float | None
    published: float | str

    @property
    def delta(self) -> float | None:
        if self.acc_mean is None or not isinstance(self.published, float):
            return None
        return self.acc_mean - self.published


@dataclass
class Section:
    """Every cell of one (recipe, device) pair: its own tables, never mixed with another section."""

    profile: str
    device: str
    cells: list[Cell]
    averages: list[Average]
    failed: list[Run]

    @property
    def recipe(self) -> str:
        return recipe_label(self.profile)


@dataclass
class Report:
    sections: list[Section]
    runs: list[Run]
    superseded: list[Run]
    problems: list[str]
    roots: list[str]


def _mean(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.fmean(present) if present else None


def recipe_label(profile: str) -> str:
    if profile == "official":
        return "official"
    if profile == "cpu":
        return "reduced (profile=cpu)"
    return f"profile={profile}"


def short_commit(commit: str) -> str:
    sha, dirty, _ = commit.partition("-dirty")
    return sha[:7] + ("-dirty" if dirty else "")


def recipe_variant(config: dict[str, Any] | None) -> str:
    """Short hash of the settings that change what is trained (RECIPE_NODES); "unknown" without a config."""
    if not config:
        return "unknown"
    chosen = {}
    for node in RECIPE_NODES:
        value = config.get(node)
        if isinstance(value, dict):
            value = {key: item for key, item in value.items() if key not in NOT_RECIPE_KEYS.get(node, ())}
        chosen[node] = value
    return hashlib.sha1(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:8]


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
    """The run's Hydra overrides: .hydra/overrides.yaml in a run dir, overrides.yaml in results/runs/."""
    import yaml

    for candidate in (
        summary_path.parent / ".hydra" / "overrides.yaml",
        summary_path.parent / "overrides.yaml",
    ):
        if candidate.is_file():
            loaded = yaml.safe_load(candidate.read_text()) or []
            return [str(item) for item in loaded]
    return None


def _status(status: Any, test_acc: float | None) -> str:
    status = str(status)
    # A run that finished without a test accuracy cannot be averaged: list it with the failures.
    return "completed without test/acc" if status == "completed" and test_acc is None else status


def run_from_summary(
    summary: dict[str, Any], source: str = "", timestamp: float = 0.0, overrides: list[str] | None = None
) -> Run:
    """A Run from the dict train.py writes to ``<run dir>/summary.json``."""
    metrics, perf = summary.get("metrics") or {}, summary.get("perf") or {}
    config = summary.get("config")
    task, attention, profile = summary["task"], summary["attention"], summary.get("profile") or "unknown"
    seed = int(summary.get("seed", config.get("seed", 0) if config else 0))
    test_acc = _float(metrics.get("test/acc"))
    return Run(
        task=task,
        attention=attention,
        profile=profile,
        device=summary.get("device") or "unknown",
        seed=seed,
        status=_status(summary.get("status", "unknown"), test_acc),
        variant=recipe_variant(config),
        test_acc=test_acc,
        val_acc_best=_float(metrics.get("val/acc_best")),
        steps_per_s=_float(perf.get("steps_per_s", metrics.get("perf/steps_per_s"))),
        peak_mem_gb=_float(perf.get("peak_mem_gb", metrics.get("perf/peak_mem_gb"))),
        peak_mem_kind=str(perf.get("peak_mem_kind", "")),
        commit=summary.get("git_commit") or "unknown",
        data_source=str((summary.get("data") or {}).get("source", "")),
        command=_command(task, attention, profile, seed, overrides),
        source=source,
        timestamp=timestamp,
        val_majority=(recorded_majority(summary.get("data") or {}, "val") or (None,))[0],
    )


def _display_path(path: Path) -> str:
    resolved = path.resolve()
    for base in (Path.cwd(), REPO_ROOT):
        if resolved.is_relative_to(base):
            return str(resolved.relative_to(base))
    return str(resolved)


def finished_at(summary: dict[str, Any], path: Path) -> float:
    """Seconds since the epoch when the run ended: summary.json's ``finished_at`` (ISO 8601), else mtime."""
    stamp = summary.get("finished_at")
    if isinstance(stamp, (int, float)):
        return float(stamp)
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return path.stat().st_mtime


def load_local_runs(roots: Sequence[Path]) -> tuple[list[Run], list[str]]:
    """Every ``summary.json`` under ``roots``; unreadable files are reported as problems, not dropped."""
    runs, problems = [], []
    for root in roots:
        for path in sorted(root.rglob("summary.json")):
            try:
                summary = json.loads(path.read_text())
                runs.append(
                    run_from_summary(
                        summary, _display_path(path), finished_at(summary, path), _read_overrides(path)
                    )
                )
            except (OSError, ValueError, KeyError, TypeError) as error:
                problems.append(
                    f"{_display_path(path)}: unreadable summary ({type(error).__name__}: {error})"
                )
    return runs, problems


def run_from_wandb(run: Any) -> Run:
    """A Run from a ``wandb.Api()`` run: its config (train.py's resolved config) and summary metrics."""
    config = dict(run.config)
    summary = dict(run.summary)
    # A W&B sweep locks the keys it sets (attention, task, seed) to the plain strings it passed.
    task = config["task"]["name"] if isinstance(config.get("task"), dict) else str(config.get("task"))
    attention = config.get("attention_name") or config.get("attention")
    profile = str(config.get("profile") or "unknown")
    seed = int(config.get("seed", 0))
    state = getattr(run, "state", "unknown")
    test_acc = _float(summary.get("test/acc"))
    return Run(
        task=task,
        attention=str(attention),
        profile=profile,
        device=str(config.get("device") or "unknown"),
        seed=seed,
        status=_status("completed" if state == "finished" else f"wandb state: {state}", test_acc),
        variant=recipe_variant(config),
        test_acc=test_acc,
        val_acc_best=_float(summary.get("val/acc_best")),
        steps_per_s=_float(summary.get("perf/steps_per_s")),
        peak_mem_gb=_float(summary.get("perf/peak_mem_gb")),
        commit=str(config.get("git_commit") or "unknown"),
        command=_command(task, str(attention), profile, seed, None),
        source=str(getattr(run, "url", "") or f"wandb:{getattr(run, 'path', '')}"),
    )


def load_wandb_runs(project: str) -> tuple[list[Run], list[str]]:
    """Runs of ``ENTITY/PROJECT`` through ``wandb.Api()``; an unreachable API is a message, not a crash."""
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


def _run_key(run: Run) -> tuple:
    return (run.profile, run.device, run.task, run.attention, run.variant, run.seed)


def _preference(run: Run) -> tuple:
    # Completed beats failed, then the newest run, then local files over W&B (they carry more detail).
    return (run.completed, run.timestamp, not run.source.startswith(("http", "wandb:")), run.source)


def deduplicate(runs: Iterable[Run]) -> tuple[list[Run], list[Run]]:
    """One run per (recipe, device, task, attention, variant, seed); returns (kept, superseded)."""
    by_key: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_key[_run_key(run)].append(run)
    kept, superseded = [], []
    for group in by_key.values():
        ordered = sorted(group, key=_preference, reverse=True)
        kept.append(ordered[0])
        superseded.extend(ordered[1:])
    return kept, superseded


def _order(names: Iterable[str], first: Sequence[str]) -> list[str]:
    names = set(names)
    return [name for name in first if name in names] + sorted(names - set(first))


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return value / baseline if value is not None and baseline else None


def build_section(
    profile: str, device: str, runs: list[Run], tasks: list[str], attentions: list[str]
) -> Section:
    """Cells, relative cost and averages of the runs of one (recipe, device) pair."""
    cells_by_key: dict[tuple[str, str, str], Cell] = {}
    for run in runs:
        cell = cells_by_key.setdefault(
            (run.task, run.attention, run.variant), Cell(run.task, run.attention, run.variant)
        )
        (cell.runs if run.completed else cell.failed).append(run)
    # The task's main variant is the config most of its completed runs share; ties go to the first hash in
    # sorted order, not the newest run: file times differ between clones, the tables must not.
    main_variant: dict[str, str] = {}
    for task in tasks:
        counts: dict[str, int] = {}
        for (cell_task, _, variant), cell in cells_by_key.items():
            if cell_task == task:
                counts[variant] = counts.get(variant, 0) + cell.n
        if counts:
            main_variant[task] = max(sorted(counts), key=lambda variant: counts[variant])

    cells = []
    for task in tasks:
        for attention in attentions:
            variants = sorted(v for (t, a, v) in cells_by_key if (t, a) == (task, attention))
            if main_variant.get(task) not in variants:
                cells.append(Cell(task, attention, main_variant.get(task, "")))
            for variant in sorted(variants, key=lambda v: v != main_variant.get(task)):
                cell = cells_by_key[(task, attention, variant)]
                cell.main_variant = variant == main_variant.get(task)
                cells.append(cell)
    for cell in cells:
        baseline = cells_by_key.get((cell.task, "softmax", cell.variant))
        if baseline is not None and baseline.runs and cell.runs:
            cell.steps_vs_softmax = _ratio(cell.steps_per_s, baseline.steps_per_s)
            if cell.peak_mem_kind == baseline.peak_mem_kind:
                cell.mem_vs_softmax = _ratio(cell.peak_mem_gb, baseline.peak_mem_gb)

    averages = []
    for attention in attentions:
        used = [
            cell
            for cell in cells
            if cell.attention == attention
            and cell.main_variant
            and cell.runs
            and cell.task not in AVERAGE_EXCLUDES
        ]
        published: float | str = published_accuracy(attention, "listops")
        if isinstance(published, float) and not used:
            published = MISSING
        elif isinstance(published, float):
            values = [published_accuracy(attention, cell.task) for cell in used]
            published = (
                statistics.fmean(values) if used and all(isinstance(v, float) for v in values) else "n/a"
            )
        averages.append(
            Average(
                attention=attention,
                tasks=[cell.task for cell in used],
                acc_mean=statistics.fmean(cell.acc_mean for cell in used) if used else None,
                published=published,
            )
        )
    failed = sorted((run for cell in cells for run in cell.failed), key=_listing_order)
    return Section(profile, device, cells, averages, failed)


def aggregate(
    runs: Iterable[Run],
    tasks: Sequence[str] | None = None,
    attentions: Sequence[str] | None = None,
    problems: Sequence[str] = (),
    roots: Sequence[str] = (),
) -> Report:
    """Group runs by (recipe, device) into sections; every (task, attention) of the grid gets a row."""
    kept, superseded = deduplicate(runs)
    tasks = _order(list(tasks or LRA_TASKS) + [run.task for run in kept], LRA_TASKS)
    attentions = ordered(list(attentions or registered_attentions()) + [run.attention for run in kept])
    by_section: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in kept:
        by_section[(run.profile, run.device)].append(run)
    order = sorted(by_section, key=lambda key: (key[0] != "official", key))
    sections = [
        build_section(profile, device, by_section[(profile, device)], tasks, attentions)
        for profile, device in order
    ]
    return Report(sections, kept, superseded, list(problems), list(roots))


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _acc(cell: Cell) -> str:
    if cell.acc_mean is None:
        return MISSING
    return f"{cell.acc_mean:.2f} ± {NO_STD if cell.acc_std is None else f'{cell.acc_std:.2f}'}"


def _num(value: float | None, pattern: str) -> str:
    return MISSING if value is None else format(value, pattern)


def _published(value: float | str) -> str:
    return f"{value:.2f}" if isinstance(value, float) else value


def _md_row(values: Iterable[Any]) -> str:
    return "| " + " | ".join(str(value).replace("|", "\\|") for value in values) + " |"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    return [_md_row(header), _md_row("---" for _ in header), *(_md_row(row) for row in rows)]


def _recipe_cell(section: Section, cell: Cell) -> str:
    if cell.main_variant:
        return section.recipe
    return f"{section.recipe}, other config {cell.variant} (not averaged)"


CELL_HEADER = (
    "task",
    "attention",
    "recipe",
    "device",
    "test acc % (mean ± std)",
    "seeds",
    "failed",
    "steps/s",
    "steps/s ÷ softmax",
    "peak mem GB",
    "mem ÷ softmax",
    f"published ({published_source()})",
    "Δ vs published",
    "commit",
)


# A hand-written reading of the tables, kept beside them and copied into lra.md's header.
READING_FILE = "reading.md"
LRA_MD_HEADER = """\
# LRA results

Generated by `python -m lra.results` (`make results`) from the runs' `summary.json` files; do not edit
by hand.
How every number was produced (command, commit, device, recipe): [README.md](README.md).

- Test accuracy in %, at the checkpoint the run's `eval.checkpoint` names (official LRA: the last one);
  mean ± sample std (n − 1) over seeds, `–` for the std of a single seed.
- `—` = no completed run for that cell. Failed runs are counted in `failed`, listed below each table and
  never averaged.
- Runs of different recipes (profile) or devices are never mixed: each pair has its own tables. Within a
  task, a run whose training settings differ from the task's main config gets its own row, marked
  `other config <hash>`.
- `÷ softmax`: ratio to softmax attention on the same task, recipe, config and device (steps/s: higher is
  faster; memory: lower is smaller). Peak memory is CUDA max-allocated on a GPU and the process peak RSS on
  a CPU (the whole process, not attention alone), counted from the start of training.
- Published: LRA paper Table 1 (Tay et al., ICLR 2021; Transformer = softmax), from `results/published.yaml`.
  TaylorShift and Fastmax report their own LRA setups, not Table 1's: `n/a (not in Table 1)`.
"""


def render_markdown(
    report: Report,
    figures: dict[tuple[str, str], list[tuple[str, str]]] | None = None,
    reading: str | None = None,
) -> str:
    """results/lra.md: one block of tables per (recipe, device); ``figures`` links its learning curves.

    ``reading``: the hand-written reading of the tables (``reading.md`` beside the outputs), placed after
    the header, since what the numbers say cannot be generated from them.
    """
    lines = [LRA_MD_HEADER]
    if reading:
        lines += [reading.strip(), ""]
    if not report.sections:
        lines += [
            "No runs found under: " + ", ".join(f"`{root}`" for root in report.roots) + ". Produce some with "
            "`make results-cpu` (reduced recipe on a CPU) or the sweep in `sweep.yaml` (see README.md).",
            "",
        ]
    for section in report.sections:
        lines += [f"## Recipe: {section.recipe} · device: {section.device}", ""]
        if section.profile != "official":
            lines += [
                f"> **Not the official LRA recipe.** `profile={section.profile}` is a reduced recipe "
                "(smaller model, fewer steps, shorter or subsampled data; see `conf/profile/`). Its "
                "accuracies are not comparable with published numbers: the Δ column only shows how far "
                "off they are.",
                "",
            ]
        rows = [
            (
                cell.task,
                cell.attention,
                _recipe_cell(section, cell),
                section.device,
                _acc(cell),
                cell.n,
                len(cell.failed),
                _num(cell.steps_per_s, ".3g"),
                _num(cell.steps_vs_softmax, ".2f"),
                _num(cell.peak_mem_gb, ".2f"),
                _num(cell.mem_vs_softmax, ".2f"),
                _published(cell.published),
                _pct(cell.delta, signed=True),
                cell.commits or MISSING,
            )
            for cell in section.cells
        ]
        lines += _md_table(CELL_HEADER, rows) + [""]
        links = (figures or {}).get((section.profile, section.device))
        if links:
            lines += [
                "Learning curves (validation accuracy against training step and training time; line: mean "
                "over seeds, band: min–max; time: steps × the run's mean step time, validation excluded): "
                + ", ".join(f"[{task}]({path})" for task, path in links)
                + ".",
                "",
            ]
        lines += [
            f"### Average over tasks ({section.recipe}, {section.device})",
            "",
            "Mean of the per-task means over the tasks this attention has completed runs for (main config "
            "only; Path-X left out as in the paper). The published average is over the same tasks.",
            "",
        ]
        average_rows = [
            (
                average.attention,
                f"{len(average.tasks)}: {', '.join(average.tasks)}" if average.tasks else MISSING,
                _pct(average.acc_mean),
                _published(average.published),
                _pct(average.delta, signed=True),
            )
            for average in section.averages
        ]
        lines += _md_table(
            ("attention", "tasks averaged", "mean test acc %", "published, same tasks", "Δ"), average_rows
        )
        lines += [""]
        if section.failed:
            lines += [f"### Failed runs ({len(section.failed)}, not averaged)", ""]
            lines += _md_table(
                ("task", "attention", "seed", "status", "summary"),
                (
                    (run.task, run.attention, run.seed, _one_line(run.status), f"`{run.source}`")
                    for run in section.failed
                ),
            )
            lines += [""]
    if report.superseded:
        lines += [
            f"{len(report.superseded)} run(s) were superseded by a newer or completed run of the same "
            "recipe, device, task, attention, config and seed; README.md lists them.",
            "",
        ]
    if report.problems:
        lines += ["## Problems", "", *(f"- {problem}" for problem in report.problems), ""]
    return "\n".join(lines)


def _one_line(text: str, limit: int = 160) -> str:
    text = re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


CSV_COLUMNS = (
    "recipe",
    "profile",
    "device",
    "task",
    "attention",
    "config",
    "main_config",
    "n_seeds",
    "seeds",
    "n_failed",
    "test_acc_mean",
    "test_acc_std",
    "steps_per_s",
    "steps_per_s_vs_softmax",
    "peak_mem_gb",
    "peak_mem_kind",
    "peak_mem_vs_softmax",
    "published",
    "published_source",
    "delta_vs_published",
    "commits",
    "data_sources",
)


def _rounded(value: Any) -> Any:
    # Six significant digits: enough for accuracies in % and for steps/s far below 1 on a CPU.
    return float(f"{value:.6g}") if isinstance(value, float) else value


def cell_record(section: Section, cell: Cell) -> dict[str, Any]:
    """One cell as a flat dict (the CSV row and the JSON entry); None where there is no value."""
    published = cell.published
    record = {
        "recipe": section.recipe,
        "profile": section.profile,
        "device": section.device,
        "task": cell.task,
        "attention": cell.attention,
        "config": cell.variant,
        "main_config": cell.main_variant,
        "n_seeds": cell.n,
        "seeds": sorted(run.seed for run in cell.runs),
        "n_failed": len(cell.failed),
        "test_acc_mean": cell.acc_mean,
        "test_acc_std": cell.acc_std,
        "steps_per_s": cell.steps_per_s,
        "steps_per_s_vs_softmax": cell.steps_vs_softmax,
        "peak_mem_gb": cell.peak_mem_gb,
        "peak_mem_kind": cell.peak_mem_kind,
        "peak_mem_vs_softmax": cell.mem_vs_softmax,
        "published": published,
        "published_source": published_source() if isinstance(published, float) or published == "FAIL" else "",
        "delta_vs_published": cell.delta,
        "commits": cell.commits,
        "data_sources": cell.data_sources,
    }
    return {key: _rounded(value) for key, value in record.items()}


def render_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for section in report.sections:
        for cell in section.cells:
            record = cell_record(section, cell)
            record["seeds"] = " ".join(str(seed) for seed in record["seeds"])
            writer.writerow({key: "" if value is None else value for key, value in record.items()})
    return buffer.getvalue()


def _run_record(run: Run) -> dict[str, Any]:
    # The timestamp is left out: it may be a file time, which a clone or a copy resets.
    return {key: value for key, value in asdict(run).items() if key not in ("timestamp", "val_majority")}


def render_json(report: Report) -> str:
    payload = {
        "published_source": published_source(),
        "sections": [
            {
                "recipe": section.recipe,
                "profile": section.profile,
                "device": section.device,
                "cells": [cell_record(section, cell) for cell in section.cells],
                "averages": [
                    {key: _rounded(value) for key, value in asdict(average).items()}
                    | {"delta_vs_published": _rounded(average.delta)}
                    for average in section.averages
                ],
                "failed": [_run_record(run) for run in section.failed],
            }
            for section in report.sections
        ],
        "runs": [_run_record(run) for run in sorted(report.runs, key=_listing_order)],
        "superseded": [_run_record(run) for run in sorted(report.superseded, key=_listing_order)],
        "problems": report.problems,
    }
    return json.dumps(payload, indent=2, sort_keys=False) + "\n"


def _rank(name: str, order: Sequence[str]) -> int:
    return order.index(name) if name in order else len(order)


def _listing_order(run: Run) -> tuple:
    return (
        run.profile != "official",
        run.profile,
        run.device,
        _rank(run.task, LRA_TASKS),
        run.task,
        attention_rank(run.attention),
        run.attention,
        run.seed,
    )


README_HEADER = """\
# Results: how every number was produced

Generated by `python -m lra.results` together with `lra.md`, `lra.csv` and `lra.json`; do not edit by hand.

## Commands

- Reduced recipe on a CPU (`results/runs/cpu/`): `make results-cpu` runs, one process per run and one run
  after another, `python train.py task=<task> attention=<attention> seed=<seed> profile=cpu logger=csv` for
  the tasks listops, text, image, pathfinder, the five attentions and seed 0 (`RESULTS_CPU_TASKS`,
  `RESULTS_CPU_ATTENTIONS` and `RESULTS_CPU_SEEDS` pick others, e.g. `RESULTS_CPU_SEEDS=1,2`; the table
  below gives each run's exact command), into `multirun/results-cpu/<date>/`, then
  `python -m lra.results --collect multirun/results-cpu/<date> --runs results/runs`, which copies each run's
  `summary.json`, `overrides.yaml` and learning curve (`curve.csv`, from its `csv/metrics.csv`) to
  `results/runs/<profile>/<device>/<task>/<attention>/seed<k>-<config>/` (see `results/runs/README.md`)
  and rebuilds these files and the learning curves in `curves/`.
- Official recipe on GPUs, a W&B grid over attention × task × seed: `wandb sweep sweep.yaml`, then
  `wandb agent ENTITY/PROJECT/SWEEP_ID` on each GPU machine. The same grid without W&B:
  `python train.py -m attention=softmax,taylorshift,fastmax,performer,linformer
  task=listops,text,retrieval,image,pathfinder,pathx seed=0,1,2 profile=official`.
- Collect and rebuild: `make results ARGS="--collect multirun/<sweep dir> --runs results/runs"` (`make
  results` passes `--out results`; without it, runs other than `results/runs` go to `outputs/results/`); add
  `--wandb-project ENTITY/PROJECT` to include W&B runs (skipped, with a message, when the API is unreachable).

The recipe is the run's `profile`: official = the task's published recipe (bf16 mixed precision on a GPU);
cpu = a reduced recipe (`conf/profile/cpu.yaml`, `conf/profile_task/`). The device is what the run recorded:
`torch.cuda.get_device_name()`, or the CPU model and core count. `config` is a hash of the training settings
(model, data, optimiser, schedule, trainer, evaluation): runs with different hashes never share a cell.
The command is rebuilt from the run's Hydra overrides (`overrides.yaml`) when they were saved with it.

## Runs
"""


def render_readme(report: Report) -> str:
    """results/README.md: how every number in lra.md was produced (command, commit, device, recipe)."""
    lines = [README_HEADER]
    if report.roots:
        lines += ["Read from: " + ", ".join(f"`{root}`" for root in report.roots) + ".", ""]
    header = (
        "recipe",
        "device",
        "task",
        "attention",
        "seed",
        "status",
        "test acc %",
        "config",
        "commit",
        "command",
        "summary",
    )

    def rows(runs: Iterable[Run]) -> Iterable[tuple]:
        for run in sorted(runs, key=_listing_order):
            acc = MISSING if run.test_acc is None else f"{100 * run.test_acc:.2f}"
            yield (
                recipe_label(run.profile),
                run.device,
                run.task,
                run.attention,
                run.seed,
                _one_line(run.status, 80),
                acc,
                run.variant,
                short_commit(run.commit),
                f"`{run.command}`",
                f"`{run.source}`",
            )

    lines += _md_table(header, rows(report.runs)) if report.runs else ["No runs found."]
    lines += [""]
    if report.superseded:
        lines += ["## Superseded runs (not counted)", "", *_md_table(header, rows(report.superseded)), ""]
    if report.problems:
        lines += ["## Problems", "", *(f"- {problem}" for problem in report.problems), ""]
    return "\n".join(lines)


def _summary_path(run: Run) -> Path | None:
    """Where a local run's summary.json is (its source is shown relative to the cwd or the repo)."""
    if run.source.startswith(("http", "wandb:")) or not run.source:
        return None
    for base in (Path.cwd(), REPO_ROOT):
        if (base / run.source).is_file():
            return base / run.source
    return None


def write_figures(report: Report, out_dir: Path) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """One learning-curve PNG per (recipe, device, task) under ``out_dir/curves``, from the main config's
    completed runs that have a curve; stale PNGs there are removed. Returns the links per section."""
    from lra.results.curves import figure_name, plot_task

    folder, links, written = out_dir / "curves", {}, set()
    for section in report.sections:
        for task in dict.fromkeys(cell.task for cell in section.cells):
            curves, majority = {}, None
            for cell in section.cells:
                if cell.task != task or not cell.main_variant:
                    continue
                paths = [_summary_path(run) for run in sorted(cell.runs, key=lambda run: run.seed)]
                found = [curve for path in paths if path and (curve := read_curve(path.parent)) is not None]
                if found:
                    curves[cell.attention] = found
                majority = next((run.val_majority for run in cell.runs if run.val_majority), majority)
            if not curves:
                continue
            path = folder / f"{figure_name(section.profile, section.device, task)}.png"
            plot_task(
                curves, f"{section.recipe}, {section.device}", task, path, registered_attentions(), majority
            )
            written.add(path)
            links.setdefault((section.profile, section.device), []).append((task, f"curves/{path.name}"))
    for stale in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if stale not in written:
            stale.unlink()
    return links


def write_outputs(report: Report, out_dir: Path) -> list[Path]:
    """Write the learning curves, then lra.md, lra.csv, lra.json and README.md into ``out_dir``."""
    figures = write_figures(report, out_dir)
    reading = out_dir / READING_FILE
    outputs = {
        "lra.md": render_markdown(report, figures, reading.read_text() if reading.is_file() else None),
        "lra.csv": render_csv(report),
        "lra.json": render_json(report),
        "README.md": render_readme(report),
    }
    paths = []
    for name, text in outputs.items():
        atomic_write_text(out_dir / name, text)
        paths.append(out_dir / name)
    return paths + sorted(out_dir / path for links in figures.values() for _, path in links)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def collect_runs(sweep_dir: Path, runs_dir: Path) -> list[Path]:
    """Copy each run's summary.json (and its Hydra overrides) found under ``sweep_dir`` into ``runs_dir``.

    Layout: ``<runs_dir>/<profile>/<device>/<task>/<attention>/seed<k>-<config>/``, where ``<config>`` is the
    recipe_variant hash, so a run with extra overrides never replaces a plain one. A folder already there
    is replaced by a completed run, or by a newer one when neither completed: a later crash never erases a
    result. Returns the summaries written.
    """
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"--collect {sweep_dir}: no such folder; pass a Hydra sweep or run directory")
    copied = []
    for path in sorted(sweep_dir.rglob("summary.json")):
        summary = json.loads(path.read_text())
        run = run_from_summary(summary, timestamp=finished_at(summary, path))
        target = (
            runs_dir
            / slug(run.profile)
            / slug(run.device)
            / run.task
            / run.attention
            / f"seed{run.seed}-{run.variant}"
        )
        existing = target / "summary.json"
        if existing.is_file():
            if existing.resolve() == path.resolve():
                continue
            old_summary = json.loads(existing.read_text())
            old = run_from_summary(old_summary, timestamp=finished_at(old_summary, existing))
            if (old.completed, old.timestamp) > (run.completed, run.timestamp):
                continue
        target.mkdir(parents=True, exist_ok=True)
        # copy2 keeps the modification time, which decides between duplicate runs later.
        shutil.copy2(path, existing)
        overrides = path.parent / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            shutil.copy2(overrides, target / "overrides.yaml")
        # The learning curve, compact, so the figures regenerate without the run's logs.
        curve = read_curve(path.parent, summary)
        if curve is not None:
            write_curve(curve, target / CURVE_FILE)
        elif (target / CURVE_FILE).is_file():
            (target / CURVE_FILE).unlink()
        copied.append(existing)
    return copied


def main(argv: Sequence[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(prog="python -m lra.results", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        type=Path,
        help="folders searched for summary.json (default: results/runs; add outputs multirun for local runs)",
    )
    parser.add_argument("--wandb-project", help="also read the runs of this W&B ENTITY/PROJECT")
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: results/ when the runs are exactly results/runs, else "
        "outputs/results/; make results passes --out results)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="print the runs side by side with the chance and majority-class rates; write nothing",
    )
    parser.add_argument(
        "--collect",
        nargs="+",
        type=Path,
        default=[],
        help="sweep/run folders whose summaries are first copied into --collect-into (the committed layout)",
    )
    parser.add_argument(
        "--collect-into",
        type=Path,
        default=REPO_ROOT / "results" / "runs",
        help="where --collect copies summaries (default: results/runs/)",
    )
    args = parser.parse_args(argv)
    if args.compare and (args.collect or args.out or args.wandb_project):
        parser.error("--compare only prints: it takes --runs, not --collect, --out or --wandb-project")

    for folder in args.collect:
        copied = collect_runs(folder, args.collect_into)
        print(f"copied {len(copied)} summaries from {folder} to {_display_path(args.collect_into)}")
    committed = [REPO_ROOT / root for root in DEFAULT_RUN_ROOTS]
    roots = args.runs or [root for root in committed if root.is_dir()]
    missing = [root for root in roots if not root.is_dir()]
    if missing:
        parser.error("no such folder: " + ", ".join(map(str, missing)))
    if args.compare:
        from lra.results.compare import load_with_summaries, render_comparison

        pairs, problems = load_with_summaries(roots)
        print(render_comparison(pairs) + "".join(f"problem: {problem}\n" for problem in problems), end="")
        return aggregate(
            [run for run, _ in pairs], problems=problems, roots=[_display_path(r) for r in roots]
        )
    runs, problems = load_local_runs(roots)
    if args.wandb_project:
        wandb_runs, wandb_problems = load_wandb_runs(args.wandb_project)
        runs += wandb_runs
        problems += wandb_problems
    report = aggregate(runs, problems=problems, roots=[_display_path(root) for root in roots])
    out = args.out
    if out is None:
        # The committed tables are rebuilt only from the committed summaries alone; any other set of runs
        # is scratch work and goes under outputs/, so it never overwrites results/ by accident.
        only_committed = {root.resolve() for root in roots} == {root.resolve() for root in committed}
        out = REPO_ROOT / ("results" if only_committed and not args.wandb_project else "outputs/results")
    written = write_outputs(report, out)
    completed = sum(run.completed for run in report.runs)
    print(
        f"{len(report.runs)} runs ({completed} completed, {len(report.runs) - completed} failed, "
        f"{len(report.superseded)} superseded) in {len(report.sections)} recipe/device tables"
    )
    print("wrote " + ", ".join(_display_path(path) for path in written))
    return report
