"""Helpers shared by the harness tests: composing the real config and running train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

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


def listops_folder(tmp_path: Path) -> Path:
    """24 short ListOps examples (16 train, 4 val, 4 test) in the official TSV layout."""
    from data.listops import generate_listops, write_listops_tsv

    folder = tmp_path / "listops"
    folder.mkdir()
    examples = generate_listops(24, seed=1, min_length=10, max_length=30)
    for split, rows in {"train": examples[:16], "val": examples[16:20], "test": examples[20:]}.items():
        write_listops_tsv(folder / f"basic_{split}.tsv", rows)
    return folder


def tiny_listops(tmp_path: Path, attention: str, data_dir: Path, *extra: str) -> list[str]:
    """Overrides for a one-layer, width-16 model on 32-token ListOps from ``data_dir``."""
    return [
        "task=listops",
        f"attention={attention}",
        f"task.data_dir={data_dir}",
        "data.seq_len=32",
        f"paths.data_dir={tmp_path / 'cache'}",
        "model.n_layers=1",
        "model.d_model=16",
        "model.num_heads=2",
        "model.qkv_dim=16",
        "model.mlp_dim=16",
        *extra,
    ]


def saved_run(run_dir: Path, overrides: list[str], seed: int = 0) -> Path:
    """A run directory as train.py lays it out (``config_resolved.yaml``, ``checkpoints/last.ckpt``) whose
    checkpoint holds the model train.py starts from with these overrides: a trained run without training."""
    from lra.build import build_model

    cfg = compose_config([*overrides, f"seed={seed}"])
    (run_dir / "checkpoints").mkdir(parents=True)
    keys = ("task", "data", "model", "attention", "optim", "scheduler")
    resolved = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in keys}
    resolved.update(seed=seed, trainer={"max_steps": cfg.trainer.max_steps})
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    L.seed_everything(seed, verbose=False)
    model = build_model(cfg.model, instantiate(cfg.attention), datamodule)
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
        run_dir / "checkpoints" / "last.ckpt",
    )
    return run_dir
