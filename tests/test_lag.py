"""lra.analysis.lag: row sharpness at init and end, and τ against the weight-decay-only path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lra.analysis.lag import analyse, decay_only_tau, initial_model, row_sharpness, tau_history
from lra.analysis.maps import example_from, load_run
from tests.helpers import listops_folder, saved_run, tiny_listops


def _saved_run(tmp_path: Path, attention: str, data_dir: Path, seed: int = 3) -> Path:
    """A run directory as train.py lays it out, whose checkpoint holds the weights train.py starts from."""
    overrides = tiny_listops(
        tmp_path,
        attention,
        data_dir,
        "optim.weight_decay=0.1",
        "scheduler.name=cosine",
        "scheduler.warmup_steps=2",
        "trainer.max_steps=20",
    )
    return saved_run(tmp_path / attention, overrides, seed)


@pytest.fixture
def listops_dir(tmp_path: Path) -> Path:
    return listops_folder(tmp_path)


def test_initial_model_is_the_one_train_py_starts_from(tmp_path, listops_dir):
    run_dir = _saved_run(tmp_path, "taylorshift", listops_dir)
    loaded, datamodule = load_run(run_dir)
    rebuilt = initial_model(run_dir, datamodule)
    for (name, saved), (_, again) in zip(
        loaded.model.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(saved, again), name


def test_sharpness_is_one_for_uniform_rows(tmp_path, listops_dir):
    run_dir = _saved_run(tmp_path, "softmax", listops_dir)
    loaded, datamodule = load_run(run_dir)
    examples = [example_from(datamodule, "val", index) for index in range(2)]
    with torch.no_grad():
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()  # q = k = 0: every row uniform over the real keys
    uniform = row_sharpness(loaded.model, examples)
    assert all(
        math.isclose(s.entropy, 1.0, rel_tol=1e-6) and math.isclose(s.peak, 1.0, rel_tol=1e-6)
        for s in uniform
    )


def test_report_and_tau_against_weight_decay(tmp_path, listops_dir):
    runs = [_saved_run(tmp_path, name, listops_dir) for name in ("softmax", "taylorshift")]
    config = OmegaConf.load(runs[1] / "config_resolved.yaml")
    decayed = decay_only_tau(config, 1.0, 20)
    assert decayed[0] == 1.0 and np.all(np.diff(decayed) <= 0) and decayed[-1] < 1.0
    # A CSV log whose τ follows the decay-only path, as Lightning writes it (steps one before).
    (runs[1] / "csv").mkdir()
    lines = ["epoch,step,attention/layer0/tau_0,attention/layer0/tau_1,val/acc"]
    lines += [f"0,{step - 1},{decayed[step]},{decayed[step]},0.5" for step in (10, 20)]
    (runs[1] / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
    assert tau_history(runs[1])[(0, 1)] == [(10, decayed[10]), (20, decayed[20])]
    md, png = analyse(runs, tmp_path / "report" / "lag", num_examples=2)
    text = md.read_text()
    assert png.is_file() and "| softmax | softmax | 0 | 1 |" in text
    assert f"| taylorshift | 0 | 0 | 1.000 | {decayed[20]:.3f} | {decayed[20]:.3f} |" in text
