"""Launching ``train.py`` runs as a user would, reading what a run leaves (``csv/metrics.csv``,
``summary.json``, ``config_resolved.yaml``, ``checkpoints/last.ckpt``), and the analyses' shared options.
Figures are drawn on ``matplotlib.figure.Figure`` directly, without pyplot, so no display is needed."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra.utils import instantiate
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from data.cache import atomic_write, atomic_write_text
from lra.build import build_model
from lra.errors import MissingCheckpointError, MissingDataError, OutputExistsError
from lra.summary import REPO_ROOT
from models.heads import LRAModel

Series = dict[str, list[tuple[int, float]]]
Key = TypeVar("Key")


def shown(path: Path) -> str:
    """A path for reports: relative to the repository when inside it (commands are run from its root)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def launch(
    runs: Mapping[Key, Path],
    overrides: Callable[[Key, Path], list[str]],
    skip_train: bool = False,
    fatal: bool = False,
) -> None:
    """Train each run with ``python train.py <overrides(key, run_dir)>``, its console in
    ``run_dir/train.log``, its exit status in ``run_dir/exit_code``; a failure raises when ``fatal``."""
    if skip_train:
        return
    # train.py resumes a run directory that holds a checkpoint, which would skip the training.
    used = [str(run_dir) for run_dir in runs.values() if (run_dir / "checkpoints").exists()]
    if used:
        raise OutputExistsError(
            f"run directories already trained: {used}; report from them with --skip-train, or remove them "
            f"(or pass another --runs-dir) to train again"
        )
    for key, run_dir in runs.items():
        command = [sys.executable, str(REPO_ROOT / "train.py"), *overrides(key, run_dir)]
        print("$", " ".join(command[1:]), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.log", "w") as log:
            code = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        atomic_write_text(run_dir / "exit_code", str(code))
        if fatal and code:
            raise RuntimeError(f"training {key} failed (exit {code}); see {run_dir / 'train.log'}")


def read_metrics(run_dir: Path) -> Series:
    """Every logged series of a run's CSV log: ``{metric: [(step, value), ...]}``."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise MissingDataError(f"{path} not found; train with logger=csv (or logger=wandb, which adds CSV)")
    series: Series = defaultdict(list)
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.pop("step")))
            for key, value in row.items():
                if value not in ("", None):
                    series[key].append((step, float(value)))
    return dict(series)


def grad_series(metrics: Series) -> Series:
    """The ``grad_norm/layer<i>/<input>`` series, keyed ``layer<i>/<input>``."""
    return {key.removeprefix("grad_norm/"): v for key, v in metrics.items() if key.startswith("grad_norm/")}


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``summary.json`` (written at the end, or at the failure), None without one."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class LoadedRun:
    name: str
    model: LRAModel
    config: Any
    summary: dict[str, Any]


def run_files(path: Path) -> tuple[Path, Path, Any]:
    """The run directory, checkpoint and resolved config of a .ckpt file or a run dir (its last.ckpt)."""
    checkpoint = path if path.is_file() else path / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise MissingCheckpointError(f"no checkpoint at {path} (looked for {checkpoint}); pass a .ckpt file")
    run_dir = path if path.is_dir() else path.parent.parent
    config_path = run_dir / "config_resolved.yaml"
    if not config_path.is_file():
        raise MissingCheckpointError(
            f"{config_path} not found; the checkpoint must sit in a train.py run directory "
            f"(<run>/checkpoints/*.ckpt next to <run>/config_resolved.yaml)"
        )
    return run_dir, checkpoint, OmegaConf.load(config_path)


def model_from_config(config: Any, datamodule: Any) -> LRAModel:
    """The model train.py builds from this resolved config (``config_resolved.yaml``), at the current seed."""
    return build_model(config.model, instantiate(config.attention), datamodule)


def load_run(path: Path, datamodule: Any | None = None) -> tuple[LoadedRun, Any]:
    """A run's model with its checkpoint's weights, and the data module (``datamodule``, else its own)."""
    run_dir, checkpoint, config = run_files(path)
    if datamodule is None:
        datamodule = instantiate(config.data)
        datamodule.setup("fit")
    model = model_from_config(config, datamodule)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    summary = read_summary(run_dir) or {}
    name = summary.get("attention") or model.encoder.attentions[0].name
    return LoadedRun(name, model.eval(), config, summary), datamodule


def analysis_parser(
    name: str, doc: str, root: Path, smoke: str, runs_dir: str | None = None
) -> argparse.ArgumentParser:
    """``python -m lra.analysis.<name>``'s parser: ``--out``, ``--smoke`` and, for an analysis that trains,
    ``--runs-dir`` and ``--skip-train``. ``root`` is the caller's REPO_ROOT, which a test may move."""
    parser = argparse.ArgumentParser(prog=f"python -m lra.analysis.{name}", description=doc.split("\n")[0])
    # Scratch output by default: the committed results/analyses/ is rewritten only when named with --out.
    out = root / "outputs" / "analyses"
    parser.add_argument("--out", type=Path, default=out, help="default: outputs/analyses")
    parser.add_argument("--smoke", action="store_true", help=smoke)
    if runs_dir is not None:
        parser.add_argument("--runs-dir", type=Path, default=out / runs_dir)
        parser.add_argument(
            "--skip-train", action="store_true", help="report from the runs already in --runs-dir"
        )
    return parser


def save_figure(figure: Figure, path: Path, dpi: int = 100, **savefig: Any) -> Path:
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=dpi, **savefig), binary=True)
    return path
