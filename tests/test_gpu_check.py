"""The GPU check (lra/gpu_check.py, issue 18) on a CPU: its dry run end to end, its deadline and kill paths,
and the report's verdicts on the kernel targets. A broken check must show up here, not in a GPU window."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lra.gpu_check import REPO, STAGES, _drain, folders
from lra.gpu_check_report import OUTPUT_FILES, TARGET_LABEL, targets_section, write_report
from lra.gpu_check_stages import Rows, run_bounded

TASKS = {"listops", "text", "image", "pathfinder", "pathx"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every stage into a temporary folder: (exit code, report folder, rows, seconds)."""
    root = tmp_path_factory.mktemp("gpu_check")
    out, scratch = root / "report", root / "scratch"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lra.gpu_check", "--dry-run", "--out", str(out), "--scratch", str(scratch)]
    started = time.time()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    return result, out, rows, time.time() - started


def test_dry_run_runs_every_stage(dry_run):
    result, out, rows, _ = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = {row["stage"]: row for row in rows if row["kind"] == "stage"}
    assert list(stages) == list(STAGES)
    assert all(row["status"] == "ok" and not row["cut"] for row in stages.values()), stages
    kinds = {row["kind"] for row in rows}
    assert {"run", "calibration", "operator", "model", "pytest", "train", "train_check", "run_end"} <= kinds


def test_dry_run_covers_the_gpu_paths(dry_run):
    _, _, rows, _ = dry_run
    operator = {row["label"] for row in rows if row["kind"] == "operator"}
    assert {"softmax backend=cudnn", "softmax backend=flash", TARGET_LABEL} <= operator
    assert {"taylorshift mode=efficient,impl=torch,compile", "fastmax impl=triton"} <= operator
    measured = {row["label"] for row in rows if row["kind"] == "operator" and row.get("fwd_bwd_ms")}
    # cuDNN cannot run on a CPU (an error row); the Triton kernels run in Triton's interpreter.
    assert TARGET_LABEL in measured and "fastmax impl=triton" in measured
    assert {row["task"] for row in rows if row["kind"] == "model" and row.get("tokens_per_s")} == TASKS
    tests = {row["test"] for row in rows if row["kind"] == "pytest"}
    assert any("grad_scaler" in name for name in tests) and any("poly_triton" in name for name in tests)
    phases = {row["phase"]: row for row in rows if row["kind"] == "train"}
    assert phases["resume"]["global_step"] > phases["train"]["global_step"]
    assert all(row["ok"] for row in rows if row["kind"] == "train_check" and row["counts"])


def test_dry_run_report_fits_one_device_call(dry_run):
    _, out, _, seconds = dry_run
    files = sorted(path.name for path in out.iterdir())
    assert set(files) == set(OUTPUT_FILES) and len(files) <= 8
    assert all((out / name).stat().st_size < 16 * 2**20 for name in files)
    report = (out / "report.md").read_text()
    for heading in ("## Stages", "## Targets", "## Where each attention overtakes softmax", "## Model level"):
        assert heading in report
    assert "**Dry run**" in report and "## Training run" in report and "## GPU tests" in report
    print(f"dry run: {seconds:.0f} s")


def test_a_dry_run_never_writes_into_results():
    out, scratch = folders(True, "dry-run-cpu", None, None)
    assert out.is_relative_to(REPO / "outputs") and scratch.is_relative_to(REPO / "outputs")
    assert folders(False, "nvidia-h100", None, None)[0] == REPO / "results" / "gpu" / "nvidia-h100"


def test_a_stage_out_of_time_keeps_its_rows_and_says_so(tmp_path):
    sink = Rows(tmp_path / "rows.jsonl")
    rows = iter([{"kind": "operator", "label": label, "seq_len": 16, "error": "x"} for label in "ab"])
    assert _drain(rows, sink, deadline=time.time() - 1, stage="operator", extra=lambda row: row) is False
    written = [json.loads(line) for line in sink.path.read_text().splitlines()]
    assert [row["kind"] for row in written] == ["operator", "cut"] and written[1]["after"] == "a N=16"


def test_a_hung_stage_is_killed_with_its_children(tmp_path):
    sleeper = "import time; time.sleep(60)"
    script = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); {sleeper}"
    started = time.time()
    assert run_bounded([sys.executable, "-c", script], timeout=2, log=tmp_path / "log") is None
    assert time.time() - started < 20


def _operator_row(label, n, fwd, fwd_bwd, peak=100.0):
    return {
        "kind": "operator",
        "label": label,
        "attention": label.split()[0],
        "dtype": "bfloat16",
        "batch": 1,
        "heads": 8,
        "head_dim": 64,
        "causal": False,
        "masked": False,
        "seq_len": n,
        "fwd_ms": fwd,
        "fwd_bwd_ms": fwd_bwd,
        "peak_mb": peak,
    }


def test_targets_are_judged_met_or_missed_by_how_much(tmp_path):
    from lra.bench_report import OperatorTable

    rows = []
    for n, scale in ((4096, 0.25), (8192, 0.5), (16384, 1.0)):
        rows += [
            _operator_row(TARGET_LABEL, n, 0.8 * scale, 4.2 * scale, peak=120.0),
            _operator_row("softmax backend=cudnn", n, 1.2 * scale**2, 4.0 * scale**2),
            _operator_row("softmax backend=flash", n, 0.1 * scale**2, 0.5 * scale**2),
        ]
    text = "\n".join(targets_section(OperatorTable(rows)))
    assert "| fwd | ≤ 1 ms | 0.800 | **met**, 20% under |" in text
    assert "| fwd+bwd | ≤ 3.5 ms | 4.20 | **missed** by 20% (1.20× the target) |" in text
    assert "faster than `softmax backend=cudnn` (fwd) | from N = 16,384 |  | **met**" in text
    assert "faster than `softmax backend=flash` (fwd+bwd) | from N = 8,192 |  | **missed**" in text
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in [{"kind": "run"}, *rows]) + "\n{not json")
    assert "**missed** by 20%" in write_report(jsonl).read_text()
    assert not Path(tmp_path / "model_vs_softmax.png").exists()  # no model rows, no model plot
