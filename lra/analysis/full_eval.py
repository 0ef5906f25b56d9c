"""Accuracy of trained runs on the whole validation and test splits.

The CPU profile evaluates on fixed 500-example subsamples (``data.max_eval_samples``), which every run of a
task shares. This re-scores a run's last checkpoint on every example of both splits, to tell a model's
behaviour from a subsample's::

    python -m lra.analysis.full_eval outputs/run-a outputs/run-b [--out results/analyses/full_eval.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from data.cache import atomic_write_text
from lra.analysis.runs import load_run, run_files, shown
from lra.errors import run_cli
from lra.markdown import md_table
from lra.module import model_inputs


@torch.no_grad()
def split_accuracy(model: torch.nn.Module, loader: Any) -> tuple[float, int]:
    """Accuracy of ``model`` over every batch of ``loader``, and the number of examples scored."""
    correct = total = 0
    for batch in loader:
        logits = model(**model_inputs(batch))
        correct += int((logits.argmax(dim=-1) == batch["label"]).sum())
        total += int(batch["label"].numel())
    return correct / max(total, 1), total


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """The run's last checkpoint scored on its task's whole validation and test splits."""
    config = run_files(run_dir)[2]
    datamodule = instantiate(config.data, max_eval_samples=None)
    datamodule.setup("fit")  # every split
    run, _ = load_run(run_dir, datamodule)
    row = {"run": shown(run_dir), "task": config.task.name, "attention": run.name, "seed": int(config.seed)}
    for split, loader in (("val", datamodule.val_dataloader()), ("test", datamodule.test_dataloader())):
        row[f"{split}_acc"], row[f"{split}_examples"] = split_accuracy(run.model, loader)
        row[f"{split}_acc_subsample"] = run.summary.get("metrics", {}).get(f"{split}/acc")
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="train.py run directories")
    parser.add_argument("--out", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = [evaluate_run(path) for path in args.runs]
    columns = ("val_acc_subsample", "val_acc", "test_acc_subsample", "test_acc")
    body = [
        [row["run"], row["task"], row["attention"], str(row["seed"])]
        + ["—" if row[key] is None else f"{100 * row[key]:.2f}" for key in columns]
        for row in rows
    ]
    header = ["run", "task", "attention", "seed", "val % (run)", "val % (whole)", "test % (run)"]
    print("\n".join(md_table([*header, "test % (whole)"], body)), end="")
    if args.out:
        atomic_write_text(args.out, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main, prog="python -m lra.analysis.full_eval")
