"""The GPU check's bounded subprocesses and its stages 1 (pytest) and 4 (a real training run);
the orchestration and the benchmark stages are in ``lra/gpu_check.py``."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lra.bench_rows import Rows

REPO = Path(__file__).resolve().parents[1]


def run_bounded(
    cmd: list[str], timeout: float, log: Path | None = None, env: dict | None = None
) -> int | None:
    """Run ``cmd`` in its own process group; kill the whole group after ``timeout`` s (then None)."""
    handle = log.open("a") if log else None
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT if handle else None,
        start_new_session=True,
    )
    try:
        return proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    finally:
        if handle:
            handle.close()


def stage_pytest(sink: Rows, deadline: float, out: Path, scratch: Path) -> str:
    """Stage 1: every test file with a ``gpu`` mark, ``-m gpu``, one row per test from its JUnit XML."""
    files = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()
    )
    junit = scratch / "pytest.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd.append(f"--junitxml={junit}")
    code = run_bounded([*cmd, *files], deadline - time.time(), log=out / "pytest.log")
    for case in ET.parse(junit).getroot().iter("testcase") if junit.is_file() else []:
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = ((child.get("message") or child.text or "").strip().splitlines() or [None])[0]
                message = message and message[:300]
                break
        test = f"{case.get('classname')}::{case.get('name')}"
        time_s = float(case.get("time") or 0.0)
        sink.emit({"kind": "pytest", "test": test, "outcome": outcome, "time_s": time_s, "message": message})
    if code is None:
        return "killed at its deadline"
    return "ok" if code in (0, 5) else f"failed (exit {code})"


def _train_losses(metrics_csv: Path) -> list[float]:
    """The train/loss values that Lightning's CSV logger wrote."""
    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as handle:
        return [
            float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss") not in (None, "")
        ]


def train_and_resume(
    spec: dict[str, Any],
    dry: bool,
    emit: Callable[[dict[str, Any]], None],
    deadline: float,
    log: Path,
    scratch: Path,
) -> str:
    """Stage 4: train ListOps for ``spec['steps']`` steps, then ``resume=`` it to ``spec['resume_steps']``.

    Emits a ``train`` row per phase and a ``train_check`` row per verdict; ``ok`` when both phases completed
    and every check passed. In the dry run the loss verdict does not count (a few steps need not lower it).
    """
    run_dir = scratch / "train"
    shutil.rmtree(run_dir, ignore_errors=True)
    # Generated ListOps goes to the scratch folder: the GPU machine starts bare, and the dry run's tiny set
    # must not land in the user's data cache.
    env = {**os.environ, "LRA_DATA_DIR": str(scratch / "data"), "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_MODE", "offline")
    # conf/logger/wandb.yaml writes the CSV log too; without the wandb package, the CSV log alone.
    logger = spec["logger"] if spec["logger"] != "wandb" or importlib.util.find_spec("wandb") else "csv"
    first = [sys.executable, "train.py", "task=listops", f"attention={spec['attention']}"]
    first += [f"profile={spec['profile']}", f"logger={logger}", f"hydra.run.dir={run_dir}"]
    first += [f"trainer.max_steps={spec['steps']}", *spec["overrides"]]
    second = [sys.executable, "train.py", f"resume={run_dir}", f"trainer.max_steps={spec['resume_steps']}"]

    def run_phase(phase: str, cmd: list[str]) -> dict[str, Any]:
        """Run ``cmd``; emit its ``train`` row from the run's summary.json (None where it wrote none)."""
        started = time.time()
        code = run_bounded(cmd, deadline - time.time(), log=log, env=env)
        path = run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        keys = ("status", "global_step", "resumed_from", "device", "perf", "metrics", "attention_values")
        row = {"kind": "train", "phase": phase, "exit_code": code, "wall_s": time.time() - started}
        row |= {key: summary.get(key) for key in keys}
        row["precision"] = ((summary.get("config") or {}).get("trainer") or {}).get("precision")
        emit(row)
        return row

    row = run_phase("train", first)
    code = row["exit_code"]
    perf, precision, kind = row["perf"] or {}, row["precision"], (row["perf"] or {}).get("peak_mem_kind")
    losses = _train_losses(run_dir / "csv" / "metrics.csv")
    loss_detail, third = f"{len(losses)} logged losses", max(1, len(losses) // 3)
    early, late = sum(losses[:third]) / third, sum(losses[-third:]) / third
    if len(losses) >= 4:
        loss_detail = f"mean of the first {third} logged losses {early:.4f}, of the last {third} {late:.4f}"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    checks = [  # (name, ok, detail, counts)
        ("train run completed", code == 0 and row["status"] == "completed", f"exit {code}", True),
        ("training loss decreases", len(losses) >= 4 and late < early, loss_detail, not dry),
        (
            "summary.json has throughput",
            all((perf.get(key) or 0) > 0 for key in ("steps_per_s", "tokens_per_s")),
            f"{perf.get('steps_per_s', 0):.3g} steps/s, {perf.get('tokens_per_s', 0):.4g} tokens/s",
            True,
        ),
        (
            "summary.json has peak memory" if dry else "summary.json has CUDA peak memory",
            (kind == "cuda_max_allocated" or dry) and (perf.get("peak_mem_gb") or 0) > 0,
            f"{perf.get('peak_mem_gb', 0):.3g} GB ({kind})",
            True,
        ),
        (
            "precision recorded" if dry else "official recipe in bf16-mixed",
            precision is not None if dry else precision == "bf16-mixed",
            f"trainer.precision={precision}",
            True,
        ),
        ("checkpoint written", checkpoint.is_file(), str(checkpoint.relative_to(scratch)), True),
    ]
    resumed, detail = False, "not run (no checkpoint or no time)"
    if checkpoint.is_file() and time.time() < deadline:
        row = run_phase("resume", second)
        code, step = row["exit_code"], row["global_step"]
        resumed = code == 0 and row["status"] == "completed" and bool(row["resumed_from"])
        resumed = resumed and step == spec["resume_steps"]
        detail = f"exit {code}; from {spec['steps']} to step {step}, resumed_from={row['resumed_from']}"
    checks.append(("resume continues to the new max_steps", resumed, detail, True))
    for name, ok, detail, counts in checks:
        emit({"kind": "train_check", "check": name, "ok": ok, "detail": detail, "counts": counts})
    failed = [name for name, ok, _, counts in checks if counts and not ok]
    return "ok" if not failed else "failed: " + "; ".join(failed)
