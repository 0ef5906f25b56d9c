"""Aggregate LRA runs into results/lra.md (plus lra.csv, lra.json and a provenance README.md).

python -m lra.results --out results                   # rebuild results/ from results/runs/ (make results)
python -m lra.results --runs outputs multirun         # your own runs: tables in outputs/results/
python -m lra.results --runs multirun/<dir> --compare # print a few runs side by side; writes nothing
python -m lra.results --collect multirun/results-cpu  # first copy a sweep's summaries into results/runs/
python -m lra.results --wandb-project ENTITY/PROJECT  # add W&B runs when the API is reachable

Without --out, the tables go to results/ only when the runs read are exactly the committed results/runs;
any other runs are scratch work and go to outputs/results/. One table per (recipe, device); a cell is
(task, attention, config variant), see cells.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from data.cache import atomic_write_text
from lra.results.cells import LRA_TASKS, MISSING, Report, aggregate
from lra.results.compare import render_comparison
from lra.results.curves import write_figures
from lra.results.render import LRA_MD_HEADER, render_csv, render_json, render_markdown, render_readme
from lra.results.runs import (
    collect_runs,
    display_path,
    load_local_runs,
    load_wandb_runs,
    recipe_variant,
    run_from_summary,
)
from lra.summary import REPO_ROOT

__all__ = ["LRA_MD_HEADER", "LRA_TASKS", "MISSING", "Report", "aggregate", "collect_runs", "load_local_runs"]
__all__ += ["main", "recipe_variant", "render_csv", "render_markdown", "run_from_summary"]


def write_outputs(report: Report, out_dir: Path) -> list[Path]:
    figures = write_figures(report, out_dir)
    reading = out_dir / "reading.md"  # the hand-written reading of the tables, kept beside them
    outputs = {
        "lra.md": render_markdown(report, figures, reading.read_text() if reading.is_file() else None),
        "lra.csv": render_csv(report),
        "lra.json": render_json(report),
        "README.md": render_readme(report),
    }
    for name, text in outputs.items():
        atomic_write_text(out_dir / name, text)
    return [out_dir / name for name in outputs] + sorted(
        out_dir / path for links in figures.values() for _, path in links
    )


def main(argv: Sequence[str] | None = None) -> Report:
    committed = REPO_ROOT / "results" / "runs"  # the only runs read by default: scratch runs never leak in
    parser = argparse.ArgumentParser(prog="python -m lra.results", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--runs", nargs="+", type=Path, help="folders searched for summary.json (default: results/runs)")
    add("--wandb-project", help="also read the runs of this W&B ENTITY/PROJECT")
    add(
        "--out",
        type=Path,
        help="output folder (default: results/ for exactly results/runs, else outputs/results/)",
    )
    add(
        "--compare",
        action="store_true",
        help="print the runs side by side with the chance and majority rates",
    )
    add(
        "--collect",
        nargs="+",
        type=Path,
        default=[],
        help="sweep/run folders first copied into --collect-into",
    )
    add("--collect-into", type=Path, default=committed, help="default: results/runs/")
    args = parser.parse_args(argv)
    if args.compare and (args.collect or args.out or args.wandb_project):
        parser.error("--compare only prints: it takes --runs, not --collect, --out or --wandb-project")

    for folder in args.collect:
        copied = collect_runs(folder, args.collect_into)
        print(f"copied {len(copied)} summaries from {folder} to {display_path(args.collect_into)}")
    roots = args.runs or ([committed] if committed.is_dir() else [])
    missing = [root for root in roots if not root.is_dir()]
    if missing:
        parser.error("no such folder: " + ", ".join(map(str, missing)))
    runs, problems = load_local_runs(roots)
    if args.wandb_project:
        wandb_runs, wandb_problems = load_wandb_runs(args.wandb_project)
        runs += wandb_runs
        problems += wandb_problems
    report = aggregate(runs, problems=problems, roots=[display_path(root) for root in roots])
    if args.compare:
        print(render_comparison(runs) + "".join(f"problem: {problem}\n" for problem in problems), end="")
        return report
    only_committed = {root.resolve() for root in roots} == {committed.resolve()}
    default_out = "results" if only_committed and not args.wandb_project else "outputs/results"
    written = write_outputs(report, args.out or REPO_ROOT / default_out)
    completed = sum(run.completed for run in report.runs)
    print(
        f"{len(report.runs)} runs ({completed} completed, {len(report.runs) - completed} failed, "
        f"{len(report.superseded)} superseded) in {len(report.sections)} recipe/device tables"
    )
    print("wrote " + ", ".join(display_path(path) for path in written))
    return report
