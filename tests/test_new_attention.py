"""Adding an attention is one module in models/attention/ plus one YAML in conf/attention/, nothing else.

A copy of the tracked repository gains ``my_softmax`` (softmax.py under a new class name, and its YAML) and
nothing more; the registry's own tests, training with attention maps, the efficiency benchmark and the
results tables then all pick it up, each run in the copy as a user would run it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY_MODEL
from tests.tiny.listops import tiny_overrides as tiny_listops

NEW = "my_softmax"
# Generous: the steps take about a minute of CPU together, but a loaded machine stretches the wall time.
STEP_TIMEOUT_S = 900
# The test files parametrised over every registered attention.
REGISTRY_TESTS = ["tests/test_all_attentions.py", "tests/test_config.py"]


def _tracked_files(root: Path) -> list[str]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout to know which files are tracked")
    return [name for name in listed.split("\0") if name and (root / name).is_file()]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The tracked files copied, plus exactly two new files: the attention's module and its YAML."""
    copy = tmp_path_factory.mktemp("repo")
    for name in _tracked_files(ROOT):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    source = (ROOT / "models/attention/softmax.py").read_text()
    # The class is renamed; nothing else changes (the attention's name comes from its file name).
    module = source.replace("class SoftmaxAttention(", "class MySoftmaxAttention(")
    assert module.count("MySoftmaxAttention") == 1
    (copy / f"models/attention/{NEW}.py").write_text(module)
    config = (ROOT / "conf/attention/softmax.yaml").read_text()
    target = "models.attention.softmax.SoftmaxAttention"
    assert target in config
    (copy / f"conf/attention/{NEW}.yaml").write_text(
        config.replace(target, f"models.attention.{NEW}.MySoftmaxAttention")
    )
    return copy


def run_in(repo: Path, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python <args>`` inside the copy, with its data and W&B files under ``tmp_path``."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(LRA_DATA_DIR=str(tmp_path / "lra-data"), WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained_run(repo: Path, tmp_path_factory) -> Path:
    """A tiny ListOps run of the new attention with the attention-maps callback; its run directory."""
    tmp_path = tmp_path_factory.mktemp("train")
    run_dir = tmp_path / "run"
    run_in(
        repo,
        [
            "train.py",
            f"attention={NEW}",
            "task=listops",
            "callbacks=attention_maps",
            "profile=cpu",
            "logger=csv",
            *tiny_listops(tmp_path),
            *TINY_MODEL,
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    return run_dir


def test_registry_tests_cover_it(repo, tmp_path):
    pytest_args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", *REGISTRY_TESTS, "-k", NEW]
    result = run_in(repo, pytest_args, tmp_path)
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed[1]) > 0, summary
    assert "failed" not in summary and "error" not in summary, summary


def test_it_trains_and_draws_its_attention_maps(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["attention"] == NEW
    assert list((trained_run / "attention_maps").glob("step*/maps.png")), "no attention maps were written"


def test_the_benchmark_measures_it(repo, tmp_path):
    result = run_in(
        repo,
        [
            "-m",
            "lra.bench",
            "bench=smoke",
            f"bench.attentions=[{NEW}]",
            f"output_dir={tmp_path}",
            "label=new",
        ],
        tmp_path,
    )
    rows = [json.loads(line) for line in (tmp_path / "new" / "rows.jsonl").read_text().splitlines()]
    measured = [
        row
        for row in rows
        if row["kind"] in ("operator", "model") and not row.get("skipped") and not row.get("error")
    ]
    assert {row["kind"] for row in measured} == {"operator", "model"}
    assert {row["attention"] for row in measured} == {NEW}
    assert NEW in result.stdout and NEW in (tmp_path / "new" / "report.md").read_text()


def test_the_results_tables_list_it(repo, trained_run, tmp_path):
    run_in(repo, ["-m", "lra.results", "--runs", str(trained_run), "--out", str(tmp_path)], tmp_path)
    for table in ("lra.md", "lra.csv", "lra.json"):
        assert NEW in (tmp_path / table).read_text(), table
