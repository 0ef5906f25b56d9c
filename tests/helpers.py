"""Helpers shared by the harness tests: composing the real config and running train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lra.registry import registered_attentions

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ATTENTIONS = registered_attentions()
TASKS = sorted(path.stem for path in (CONF / "task").glob("*.yaml"))
# A model small enough that a few steps of any task take seconds on a CPU.
TINY_MODEL = [
    "model.n_layers=1",
    "model.d_model=16",
    "model.num_heads=2",
    "model.qkv_dim=16",
    "model.mlp_dim=32",
    "trainer.max_steps=3",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "data.max_eval_samples=8",
    "callbacks.throughput.warmup_steps=1",
]


def compose_config(overrides: list[str]) -> DictConfig:
    """The config train.py would see, composed without running it (hydra:* interpolations unresolved)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def run_train(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train.py as a user would, with data and outputs under ``tmp_path``."""
    env = {
        **os.environ,
        "LRA_DATA_DIR": str(tmp_path / "lra-data"),
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "0",
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_summaries(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.rglob("summary.json"))]
