"""From runs to table cells.

Duplicates of one run are dropped (runs.deduplicate). The rest are grouped by (recipe, device) into Sections,
which never share a number, and within a Section by (task, attention, config variant) into Cells: mean and
sample std (n - 1) of test accuracy over the completed seeds, mean steps/s and peak memory, and these two
relative to softmax on the same task and config. Every (task, attention) of the grid gets a cell, empty when
nothing ran there, so that missing results show.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pandas as pd

from lra.registry import ordered, published_accuracy, registered_attentions
from lra.results.runs import LRA_TASKS, Run, deduplicate, listing_order, recipe_label, short_commit

# The LRA average leaves Path-X out (every model in Tay et al. 2021, arXiv 2011.04006, fails it).
AVERAGE_EXCLUDES = ("pathx",)
MISSING = "—"
CELL_KEYS = ["task", "attention", "variant"]
CELL_NUMBERS = ["acc_mean", "acc_std", "steps_per_s", "peak_mem_gb", "peak_mem_kind"]
CELL_NUMBERS += ["steps_vs_softmax", "mem_vs_softmax"]


def difference(value: float | None, published: float | str) -> float | None:
    """``value`` minus the published number, None when either is missing (or published is "FAIL")."""
    return None if value is None or not isinstance(published, float) else value - published


@dataclass
class Cell:
    """One (task, attention, config variant) of a (recipe, device) section; accuracies in %."""

    task: str
    attention: str
    variant: str = ""
    main_variant: bool = True
    runs: list[Run] = field(default_factory=list)  # the completed ones
    failed: list[Run] = field(default_factory=list)
    acc_mean: float | None = None
    acc_std: float | None = None  # sample std (n - 1) over seeds; None for fewer than two seeds
    steps_per_s: float | None = None
    peak_mem_gb: float | None = None
    peak_mem_kind: str = ""
    steps_vs_softmax: float | None = None
    mem_vs_softmax: float | None = None

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def published(self) -> float | str:
        return published_accuracy(self.attention, self.task)

    @property
    def delta(self) -> float | None:
        return difference(self.acc_mean, self.published)

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
        return difference(self.acc_mean, self.published)


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


def cell_numbers(completed: list[Run]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """CELL_NUMBERS of each (task, attention, variant) that has completed runs; None where there is none."""
    if not completed:
        return {}
    runs = pd.DataFrame([asdict(run) for run in completed], columns=[column.name for column in fields(Run)])
    cells = runs.groupby(CELL_KEYS, as_index=False).agg(
        acc_mean=("test_acc", "mean"),
        acc_std=("test_acc", "std"),
        steps_per_s=("steps_per_s", "mean"),
        peak_mem_gb=("peak_mem_gb", "mean"),
        peak_mem_kind=("peak_mem_kind", lambda kinds: "/".join(sorted(set(kinds) - {""}))),
    )
    cells[["acc_mean", "acc_std"]] *= 100
    # Cost relative to softmax on the same task and config; memory only when both measured the same thing.
    softmax = cells[cells.attention == "softmax"].drop(columns="attention")
    cells = cells.merge(softmax, on=["task", "variant"], how="left", suffixes=("", " of softmax"))
    # A zero or missing softmax number gives no ratio (NaN, then None) rather than infinity.
    cells["steps_vs_softmax"] = cells.steps_per_s / cells["steps_per_s of softmax"].replace(0, float("nan"))
    mem_ratio = cells.peak_mem_gb / cells["peak_mem_gb of softmax"].replace(0, float("nan"))
    cells["mem_vs_softmax"] = mem_ratio.where(cells.peak_mem_kind == cells["peak_mem_kind of softmax"])
    numbers = cells.set_index(CELL_KEYS)[CELL_NUMBERS].astype(object)
    return numbers.where(numbers.notna(), None).to_dict("index")


def main_variants(runs: list[Run]) -> dict[str, str]:
    """Per task, the config most of its completed runs share. Ties go to the first hash in sorted order, not
    the newest run: file times differ between clones, the tables must not."""
    frame = pd.DataFrame(
        [(run.task, run.variant, run.completed) for run in runs], columns=["task", "variant", "n"]
    )
    best = frame.groupby(["task", "variant"]).n.sum().groupby(level="task").idxmax()
    return {task: variant for task, (_, variant) in best.items()}


def averages(cells: list[Cell], attentions: list[str]) -> list[Average]:
    """Per attention, the mean of its main-config cells' means and the published average over those tasks."""
    result = []
    for attention in attentions:
        used = [cell for cell in cells if cell.attention == attention and cell.main_variant and cell.runs]
        used = [cell for cell in used if cell.task not in AVERAGE_EXCLUDES]
        published: float | str = published_accuracy(attention, "listops")
        if isinstance(published, float):  # in Table 1: the published average over the same tasks
            values = [cell.published for cell in used]
            floats = all(isinstance(value, float) for value in values)
            published = (statistics.fmean(values) if floats else "n/a") if used else MISSING
        mean = statistics.fmean(cell.acc_mean for cell in used) if used else None
        result.append(Average(attention, [cell.task for cell in used], mean, published))
    return result


def build_section(
    profile: str, device: str, runs: list[Run], tasks: list[str], attentions: list[str]
) -> Section:
    """Cells, relative cost and averages of the runs of one (recipe, device) pair, in table order."""
    numbers = cell_numbers([run for run in runs if run.completed])
    main = main_variants(runs)
    cells = []
    for task, attention in itertools.product(tasks, attentions):
        mine = [run for run in runs if (run.task, run.attention) == (task, attention)]
        # The task's main config first (an empty cell when this attention has no run of it), then others.
        main_variant = main.get(task, "")
        variants = sorted(
            {run.variant for run in mine} | {main_variant}, key=lambda v: (v != main_variant, v)
        )
        for variant in variants:
            done = [run for run in mine if run.variant == variant]
            completed, failed = [r for r in done if r.completed], [r for r in done if not r.completed]
            key = (task, attention, variant)
            cells.append(Cell(*key, variant == main_variant, completed, failed, **numbers.get(key, {})))
    failed = sorted((run for cell in cells for run in cell.failed), key=listing_order)
    return Section(profile, device, cells, averages(cells, attentions), failed)


def aggregate(runs: Iterable[Run], problems: Sequence[str] = (), roots: Sequence[str] = ()) -> Report:
    """Group runs by (recipe, device) into sections; every (task, attention) of the grid gets a row."""
    kept, superseded = deduplicate(runs)
    tasks = [*LRA_TASKS, *sorted({run.task for run in kept} - set(LRA_TASKS))]
    attentions = ordered(registered_attentions() + [run.attention for run in kept])
    by_section: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in kept:
        by_section[run.profile, run.device].append(run)
    order = sorted(by_section, key=lambda key: (key[0] != "official", key))
    sections = [build_section(*key, by_section[key], tasks, attentions) for key in order]
    return Report(sections, kept, superseded, list(problems), list(roots))
