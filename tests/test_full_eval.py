"""lra.analysis.full_eval: a run's checkpoint scored on every example of its validation and test splits."""

from __future__ import annotations

import json

import pytest
import torch

from lra.analysis.full_eval import evaluate_run, main, split_accuracy
from lra.analysis.maps import load_run
from lra.errors import MissingCheckpointError
from tests.helpers import listops_folder, saved_run, tiny_listops


def _run(tmp_path):
    overrides = tiny_listops(tmp_path, "softmax", listops_folder(tmp_path), "+data.max_eval_samples=2")
    return saved_run(tmp_path / "run", overrides)


def test_every_example_is_scored_whatever_the_runs_subsample(tmp_path):
    run_dir = _run(tmp_path)
    row = evaluate_run(run_dir)
    # The tiny ListOps folder has 4 validation and 4 test examples; the run itself scored 2 of each.
    assert (row["val_examples"], row["test_examples"]) == (4, 4)
    assert row["task"] == "listops" and row["attention"] == "softmax" and row["seed"] == 0
    assert row["val_acc_subsample"] is None  # saved_run writes no summary.json
    loaded, datamodule = load_run(run_dir)
    datamodule.max_eval_samples = None
    datamodule.setup("test")
    assert row["test_acc"] == split_accuracy(loaded.model, datamodule.test_dataloader())[0]
    assert 0.0 <= row["val_acc"] <= 1.0


def test_main_prints_a_table_and_writes_the_rows(tmp_path, capsys):
    run_dir = _run(tmp_path)
    out = tmp_path / "full_eval.json"
    main([str(run_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| val % (whole) |" in printed and "| listops | softmax | 0 |" in printed
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["test_examples"] == 4
    assert torch.isfinite(torch.tensor(rows[0]["test_acc"]))


def test_a_folder_that_is_not_a_run_is_named_in_the_error(tmp_path):
    with pytest.raises(MissingCheckpointError, match="no checkpoint at .*not-a-run"):
        evaluate_run(tmp_path / "not-a-run")
