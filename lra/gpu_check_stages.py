"""The GPU check's row sink, bounded subprocesses, and its stages 1 (pytest) and 4 (a real training run).

The orchestration, presets and the benchmark stages are in ``lra/gpu_check.py``.
"""

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

REPO = Path(__file__).resolve().parents[1]


class Rows:
    """Append-only JSONL sink shared (in turn) by the parent and the stage processes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def emit(self, row: dict[str, Any]) -> None:
        from lra.summary import to_jsonable

        with self.path.open("a") as sink:
            sink.write(json.dumps(to_jsonable(row), sort_keys=True, default=str) + "\n")


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


def stage_pytest(sink: Rows, deadline: float, out: Path, scratch: Path, **_: Any) -> str:
    """Stage 1: every test file with a ``gpu`` mark, ``-m gpu``, one row per test from its JUnit XML."""
    files = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text()
    )
    junit = scratch / "pytest.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd.append(f"--junitxml={junit}")
    code = run_bounded([*cmd, *files], deadline - time.time(), log=out / "pytest.log")
    for row in pytest_rows(junit):
        sink.emit(row)
    if code is None:
        return "killed at its deadline"
    return "ok" if code in (0, 5) else f"failed (exit {code})"


def stage_train(
    preset: dict[str, Any], dry: bool, sink: Rows, deadline: float, out: Path, scratch: Path, **_: Any
) -> str:
    """Stage 4: train.py on the ListOps recipe, then resumed (``train_and_resume``)."""
    return train_and_resume(
        preset["train"], dry, sink.emit, deadline, out / "train.log", scratch, run_bounded
    )


def pytest_rows(junit: Path) -> list[dict[str, Any]]:
    """One row per test case of a JUnit XML report: outcome, seconds, the first line of any message."""
    if not junit.is_file():
        return []
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else None
                break
        rows.append(
            {
                "kind": "pytest",
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "time_s": float(case.get("time") or 0.0),
                "message": message,
            }
        )
    return rows


def train_losses(metrics_csv: Path) -> list[tuple[int, float]]:
    """(step, train/loss) pairs that Lightning's CSV logger wrote."""
    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as handle:
        return [
            (int(row["step"]), float(row["train/loss"]))
            for row in csv.DictReader(handle)
            if row.get("train/loss") not in (None, "")
        ]


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _summary_row(phase: str, summary: dict[str, Any], code: int | None, wall_s: float) -> dict[str, Any]:
    config = summary.get("config") or {}
    return {
        "kind": "train",
        "phase": phase,
        "exit_code": code,
        "wall_s": wall_s,
        "status": summary.get("status"),
        "global_step": summary.get("global_step"),
        "resumed_from": summary.get("resumed_from"),
        "device": summary.get("device"),
        "precision": (config.get("trainer") or {}).get("precision"),
        "perf": summary.get("perf"),
        "metrics": summary.get("metrics"),
        "attention_values": summary.get("attention_values"),
    }


def train_and_resume(
    spec: dict[str, Any],
    dry: bool,
    emit: Callable[[dict[str, Any]], None],
    deadline: float,
    log: Path,
    scratch: Path,
    run_bounded: Callable[..., int | None],
) -> str:
    """Train ListOps for ``spec['steps']`` steps, then ``resume=`` the run to ``spec['resume_steps']``.

    Emits a ``train`` row per phase (from its summary.json) and a ``train_check`` row per verdict. Returns
    the stage status: ``ok`` when both phases completed and every check passed. In the dry run the loss
    verdict is recorded but does not count (a handful of steps need not lower the loss).
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
    checks: list[tuple[str, bool, str, bool]] = []  # (name, ok, detail, counts)

    started = time.time()
    code = run_bounded(first, deadline - time.time(), log=log, env=env)
    summary = _summary(run_dir)
    emit(_summary_row("train", summary, code, time.time() - started))
    losses = train_losses(run_dir / "csv" / "metrics.csv")
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    checks.append(
        ("train run completed", code == 0 and summary.get("status") == "completed", f"exit {code}", True)
    )
    checks += _loss_check(losses, counts=not dry)
    checks += _summary_checks(summary, dry)
    checks.append(("checkpoint written", checkpoint.is_file(), str(checkpoint.relative_to(scratch)), True))

    if checkpoint.is_file() and time.time() < deadline:
        started = time.time()
        code = run_bounded(second, deadline - time.time(), log=log, env=env)
        resumed = _summary(run_dir)
        emit(_summary_row("resume", resumed, code, time.time() - started))
        ok = code == 0 and resumed.get("status") == "completed" and bool(resumed.get("resumed_from"))
        step = resumed.get("global_step")
        detail = (
            f"exit {code}; from {spec['steps']} to step {step}, resumed_from={resumed.get('resumed_from')}"
        )
        checks.append(
            ("resume continues to the new max_steps", ok and step == spec["resume_steps"], detail, True)
        )
    else:
        checks.append(
            ("resume continues to the new max_steps", False, "not run (no checkpoint or no time)", True)
        )
    for name, ok, detail, counts in checks:
        emit({"kind": "train_check", "check": name, "ok": ok, "detail": detail, "counts": counts})
    failed = [name for name, ok, _, counts in checks if counts and not ok]
    return "ok" if not failed else "failed: " + "; ".join(failed)


def _loss_check(losses: list[tuple[int, float]], counts: bool) -> list[tuple[str, bool, str, bool]]:
    if len(losses) < 4:
        return [("training loss decreases", False, f"{len(losses)} logged losses", counts)]
    third = max(1, len(losses) // 3)
    early = sum(loss for _, loss in losses[:third]) / third
    late = sum(loss for _, loss in losses[-third:]) / third
    detail = f"mean of the first {third} logged losses {early:.4f}, of the last {third} {late:.4f}"
    return [("training loss decreases", late < early, detail, counts)]


def _summary_checks(summary: dict[str, Any], dry: bool) -> list[tuple[str, bool, str, bool]]:
    perf = summary.get("perf") or {}
    precision = ((summary.get("config") or {}).get("trainer") or {}).get("precision")
    kind = perf.get("peak_mem_kind")
    throughput = all((perf.get(key) or 0) > 0 for key in ("steps_per_s", "tokens_per_s"))
    return [
        (
            "summary.json has throughput",
            throughput,
            f"{perf.get('steps_per_s', 0):.3g} steps/s, {perf.get('tokens_per_s', 0):.4g} tokens/s",
            True,
        ),
        (
            "summary.json has CUDA peak memory" if not dry else "summary.json has peak memory",
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
    ]
