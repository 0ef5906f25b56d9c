"""The run's summary.json: results that never depend on the W&B service."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from data.cache import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
# The constructor the ``model`` config node names; runs recorded before it did carry neither it nor the root
# attn_dropout (which lived in the node). recorded_model and lra.build.build_model convert between the two.
MODEL_TARGET = "models.heads.LRAModel"


def recorded_model(config: dict[str, Any]) -> Any:
    """The ``model`` node in the layout runs recorded before it named its constructor (no ``_target_``) and
    handed ``attn_dropout`` to the root: the one layout in which older and newer runs compare."""
    model = config.get("model")
    if not isinstance(model, dict):
        return model
    if model.get("_target_") == MODEL_TARGET:  # another backbone keeps its target, so differs
        model = {key: value for key, value in model.items() if key != "_target_"}
    return {**model, "attn_dropout": config["attn_dropout"]} if "attn_dropout" in config else model


def git_commit() -> str:
    """HEAD of this repository, ``-dirty`` with uncommitted changes, ``unknown`` outside git."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return run.stdout.strip()

    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    import lightning

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda or "none",
    }
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        found["triton"] = "none"
    if torch.backends.cudnn.is_available():
        found["cudnn"] = str(torch.backends.cudnn.version())
    return found


def to_jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(summary), indent=2, sort_keys=True) + "\n")
