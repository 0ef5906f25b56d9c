"""End to end through train.py, as a user runs it: every attention on ListOps, every task on tiny data."""

import importlib
import json
from datetime import datetime

import pytest

from tests.helpers import ATTENTIONS, TASKS, TINY_MODEL, read_summaries, run_train
from tests.tiny.listops import tiny_overrides as tiny_listops


def _check_summary(summary: dict, task: str, attention: str) -> None:
    assert summary["status"] == "completed", summary["status"]
    assert summary["task"] == task and summary["attention"] == attention
    assert 0.0 <= summary["metrics"]["test/acc"] <= 1.0
    assert "val/acc_best" in summary["metrics"]
    perf = summary["perf"]
    assert perf["steps_per_s"] > 0 and perf["tokens_per_s"] > 0 and perf["peak_mem_gb"] > 0
    assert summary["versions"]["torch"] and summary["device"] and summary["git_commit"]
    assert summary["config"]["task"]["name"] == task
    assert datetime.fromisoformat(summary["finished_at"]).tzinfo is not None


def test_every_attention_trains_on_listops_with_wandb(tmp_path):
    """One Hydra multirun over the whole attention registry, logged to offline W&B and summary.json.

    The sequence is padded to 300 so that Linformer's default 256 projected positions fit.
    """
    result = run_train(
        [
            "-m",
            f"attention={','.join(ATTENTIONS)}",
            "task=listops",
            "profile=cpu",
            *tiny_listops(tmp_path),
            "data.seq_len=300",
            *TINY_MODEL,
            f"hydra.sweep.dir={tmp_path / 'multirun'}",
        ],
        tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summaries = {s["attention"]: s for s in read_summaries(tmp_path / "multirun")}
    assert sorted(summaries) == sorted(ATTENTIONS)
    for attention, summary in summaries.items():
        _check_summary(summary, "listops", attention)
        run_dir = tmp_path / "multirun" / summary["output_dir"].split("multirun/")[-1]
        assert (run_dir / "config_resolved.yaml").is_file()
        assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run was written"
    assert "Profile: cpu" in result.stdout


@pytest.mark.parametrize("task", TASKS)
def test_every_task_trains_on_tiny_data(task, tmp_path):
    tiny = importlib.import_module(f"tests.tiny.{task}")
    result = run_train(
        [
            f"task={task}",
            "attention=softmax",
            "profile=cpu",
            "logger=csv",
            *tiny.tiny_overrides(tmp_path),
            *TINY_MODEL,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    _check_summary(summary, task, "softmax")
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()
    assert "test/acc" in result.stdout


def test_best_val_checkpoint_and_no_logger(tmp_path):
    result = run_train(
        [
            "task=listops",
            "attention=performer",
            "profile=cpu",
            "logger=none",
            "eval.checkpoint=best_val",
            *tiny_listops(tmp_path),
            *TINY_MODEL,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["config"]["eval"]["checkpoint"] == "best_val"


def test_missing_release_folder_says_where_and_how(tmp_path):
    missing = tmp_path / "nowhere" / "listops-1000"
    result = run_train(
        [
            "task=listops",
            "profile=cpu",
            "logger=none",
            f"task.data_dir={missing}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert str(missing) in message
    assert "basic_train.tsv" in message and "lra_release" in message


def test_unknown_attention_fails_before_training(tmp_path):
    result = run_train(["attention=flashy", "profile=cpu"], tmp_path)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "flashy" in message and "taylorshift" in message and "softmax" in message
