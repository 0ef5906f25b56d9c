"""Resuming killed runs: SIGKILL mid-epoch then resume equals an uninterrupted run; atomic checkpoints;
``resume=`` expansion; the W&B run id is reused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lra.build import instantiate_loggers
from lra.resume import (
    AtomicCheckpointIO,
    expand_resume_argv,
    resume_checkpoint,
    wandb_run_id,
)
from tests.fault_hooks import STALL_ENV, STALLED_MARKER
from tests.helpers import ROOT, TINY_MODEL, compose_config, run_train
from tests.tiny.listops import tiny_overrides as tiny_listops


def _start_train(args, tmp_path, extra_env=None):
    env = {
        **os.environ,
        "LRA_DATA_DIR": str(tmp_path / "lra-data"),
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    log = open(tmp_path / f"log-{len(list(tmp_path.glob('log-*')))}.txt", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env, stdout=log, stderr=log
    )


def _wait_for(path, process, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training exited with {process.returncode} before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.2)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    """32 examples in batches of 3 make 10 steps per epoch; validation (and last.ckpt) every 4 steps.

    The victim is SIGKILLed at the start of step 11, so its last checkpoint is step 8, in the middle of
    epoch 0. Resuming replays batches 9-10 of epoch 0 and 11-12 of epoch 1 (a new sampler epoch), with
    the dropout random stream restored: the result must equal the uninterrupted run's exactly.
    """
    args = [
        "task=listops",
        "attention=softmax",
        "profile=cpu",
        "logger=csv",
        *tiny_listops(tmp_path),
        *TINY_MODEL,
        "trainer.max_steps=12",
        "trainer.val_check_interval=4",
        "data.batch_size=3",
        "trainer.deterministic=true",
        "trainer.enable_progress_bar=false",
        "+callbacks.stall._target_=tests.fault_hooks.StallAtStep",
    ]
    reference_dir, victim_dir = tmp_path / "reference", tmp_path / "victim"
    reference = _start_train([*args, f"hydra.run.dir={reference_dir}"], tmp_path)
    victim = _start_train([*args, f"hydra.run.dir={victim_dir}"], tmp_path, {STALL_ENV: "10"})
    try:
        _wait_for(victim_dir / STALLED_MARKER, victim)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert reference.wait(timeout=300) == 0, (tmp_path / "log-0.txt").read_text()[-3000:]
    finally:
        for process in (reference, victim):
            if process.poll() is None:
                process.kill()
    assert not (victim_dir / "summary.json").exists()
    killed_at = torch.load(victim_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert killed_at["global_step"] == 8 and killed_at["epoch"] == 0

    resumed = run_train([f"resume={victim_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout
    expected = json.loads((reference_dir / "summary.json").read_text())
    got = json.loads((victim_dir / "summary.json").read_text())
    assert got["status"] == "completed" and got["resumed_from"] == str(
        victim_dir / "checkpoints" / "last.ckpt"
    )
    assert got["global_step"] == expected["global_step"] == 12
    for key in ("train/loss", "train/acc", "val/acc", "val/acc_best", "val/loss", "test/acc", "test/loss"):
        assert got["metrics"][key] == pytest.approx(expected["metrics"][key], abs=1e-6), key
    # resume=<run dir> alone replayed the original command line.
    for section in ("task", "data", "model", "attention", "optim", "scheduler", "seed"):
        assert got["config"][section] == expected["config"][section], section
    assert not list(victim_dir.rglob("*.tmp-*"))


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 4}, path)

    def dies_half_way(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 8}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    # A temporary file left by a SIGKILL is removed by the next save.
    (path.parent / ".last.ckpt.tmp-123-abcd").write_bytes(b"partial")
    io.save_checkpoint({"global_step": 12}, path)
    assert io.load_checkpoint(path)["global_step"] == 12
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_resume_replays_the_original_overrides_and_reuses_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    original = ["task=listops", "model.d_model=16", "+callbacks.stall._target_=x.Y", "profile=cpu"]
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(original))
    argv = expand_resume_argv([f"resume={run_dir}", "model=encoder", "trainer.max_steps=20"])
    assert argv == [
        "task=listops",
        "+callbacks.stall._target_=x.Y",
        "profile=cpu",
        f"resume={run_dir}",
        "model=encoder",
        "trainer.max_steps=20",
        f"hydra.run.dir={run_dir.resolve()}",
    ]
    # DDP re-runs train.py with the expanded argv: expanding again must add nothing.
    assert expand_resume_argv(argv) == argv
    assert expand_resume_argv(["seed=1"]) == ["seed=1"]
    # The expanded command line composes (the +key is added once).
    compose_config([arg for arg in argv if not arg.startswith("hydra.")])
    with pytest.raises(ValueError, match="sweep"):
        expand_resume_argv(["-m", f"resume={run_dir}"])
    with pytest.raises(ValueError, match="no run directory"):
        expand_resume_argv([f"resume={tmp_path / 'missing'}"])


def test_resume_checkpoint_lookup(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert resume_checkpoint(None, run_dir) is None
    with pytest.raises(FileNotFoundError, match="before its first checkpoint"):
        resume_checkpoint(str(run_dir), run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resume_checkpoint(str(run_dir), tmp_path / "other") == last
    # Reusing a run directory resumes from its own last checkpoint.
    assert resume_checkpoint(None, run_dir) == last
    assert resume_checkpoint(str(last), tmp_path / "other") == last


def test_a_reused_run_dir_with_another_model_is_refused(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    config = {"task": {"name": "listops"}, "model": {"d_model": 16}, "data": {"seq_len": 64}, "trainer": {}}
    (tmp_path / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    longer = config | {"trainer": {"max_steps": 100}}
    assert resume_checkpoint(None, tmp_path, longer) == last
    wider = config | {"model": {"d_model": 32}}
    with pytest.raises(ValueError, match="different model; pass the original values"):
        resume_checkpoint(None, tmp_path, wider)


def test_a_run_dir_from_before_the_model_node_named_its_constructor_continues(tmp_path):
    """Older runs recorded attn_dropout inside ``model`` and no ``_target_``; the same run today continues,
    and a changed attention dropout still counts as another model."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    saved = {"task": {"name": "listops"}, "model": {"d_model": 16, "attn_dropout": 0.1}, "seed": 0}
    (tmp_path / "config_resolved.yaml").write_text(yaml.safe_dump(saved))
    today = saved | {"model": {"_target_": "models.heads.LRAModel", "d_model": 16}, "attn_dropout": 0.1}
    assert resume_checkpoint(None, tmp_path, today) == last
    with pytest.raises(ValueError, match="different model; pass the original values"):
        resume_checkpoint(None, tmp_path, today | {"attn_dropout": 0.0})


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path):
    overrides = [f"logger.{name}.save_dir={tmp_path}" for name in ("wandb", "csv")]
    cfg = compose_config(["logger=wandb", "logger.wandb.name=run", "logger.wandb.tags=[]", *overrides])
    first = instantiate_loggers(cfg.logger, tmp_path)
    again = instantiate_loggers(cfg.logger, tmp_path)
    wandb_first = next(logger for logger in first if type(logger).__name__ == "WandbLogger")
    wandb_again = next(logger for logger in again if type(logger).__name__ == "WandbLogger")
    assert wandb_first.version == wandb_again.version == wandb_run_id(tmp_path)
    assert wandb_again._wandb_init["resume"] == "allow"
