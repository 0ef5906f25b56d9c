"""What the analyses share: launching ``train.py`` runs as a user would, reading the files a run leaves
(``csv/metrics.csv``, ``summary.json``), the ``--out`` / ``--runs-dir`` options, and matplotlib."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lra.errors import MissingDataError, OutputExistsError
from lra.summary import REPO_ROOT

Series = dict[str, list[tuple[int, float]]]


def shown(path: Path) -> str:
    """A path for reports: relative to the repository when inside it (commands are run from its root)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def check_fresh(run_dirs: Sequence[Path]) -> None:
    """train.py resumes a run directory that already holds a checkpoint, which would skip the training."""
    used = [str(path) for path in run_dirs if (path / "checkpoints").exists()]
    if used:
        raise OutputExistsError(
            f"run directories already trained: {used}; report from them with --skip-train, or remove them "
            f"(or pass another --runs-dir) to train again"
        )


def train(overrides: Sequence[str], run_dir: Path) -> int:
    """``python train.py <overrides>`` from the repository root, its console in ``run_dir/train.log``.

    Returns:
        The exit code (the caller decides whether a failed run is fatal or a row of its report).
    """
    command = [sys.executable, str(REPO_ROOT / "train.py"), *overrides]
    print("$", " ".join(command[1:]), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "w") as log:
        return subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode


def read_metrics(run_dir: Path) -> Series:
    """Every logged series of a run's CSV log: ``{metric: [(step, value), ...]}``."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise MissingDataError(f"{path} not found; train with logger=csv (or logger=wandb, which adds CSV)")
    series: Series = defaultdict(list)
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row["step"]))
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series[key].append((step, float(value)))
    return dict(series)


def grad_series(metrics: Series) -> Series:
    """The ``grad_norm/layer<i>/<input>`` series, keyed ``layer<i>/<input>``."""
    return {
        key.removeprefix("grad_norm/"): value
        for key, value in metrics.items()
        if key.startswith("grad_norm/")
    }


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``summary.json`` (what train.py wrote at the end, or at the failure), None without one."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def add_output_arguments(parser: argparse.ArgumentParser, root: Path, runs_dir: str | None = None) -> None:
    """``--out`` under ``root/outputs/analyses`` and, for an analysis that trains, ``--runs-dir`` and
    ``--skip-train``. ``root`` is the caller's ``REPO_ROOT``, which a test may point elsewhere."""
    # Scratch output by default: the committed results/analyses/ is rewritten only when named with --out.
    parser.add_argument(
        "--out", type=Path, default=root / "outputs" / "analyses", help="default: outputs/analyses"
    )
    if runs_dir is not None:
        parser.add_argument("--runs-dir", type=Path, default=root / "outputs" / "analyses" / runs_dir)
        parser.add_argument(
            "--skip-train", action="store_true", help="report from the runs already in --runs-dir"
        )


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (the analyses run on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path, dpi: int = 100, **savefig: Any) -> Path:
    """Write ``figure`` to ``path`` (parents created) and close it; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, **savefig)
    pyplot().close(figure)
    return path
