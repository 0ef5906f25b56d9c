"""Resuming a killed run: the run directory, its latest checkpoint, its W&B id, and atomic checkpoint files.

``python train.py resume=<run dir>`` replays the run's original overrides (``.hydra/overrides.yaml``; new ones
win) into the same directory. Reusing a run directory (``hydra.run.dir=<dir>``, or a sweep rerun with the
same ``hydra.sweep.dir``) resumes from ``<dir>/checkpoints/last.ckpt`` by itself.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from data.cache import atomic_write_text, temporary_sibling
from lra.errors import MissingCheckpointError, ResumeError
from lra.summary import recorded_model

LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
WANDB_ID_FILE = "wandb_id"
# What a checkpoint's weights and data order depend on: resuming with one of these changed is another run.
RUN_DEFINING_KEYS = (
    "task.name",
    "model",
    "attention",
    "data._target_",
    "data.seq_len",
    "data.batch_size",
    "seed",
)


def _override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def run_dir_of(resume: str | os.PathLike) -> Path | None:
    """The run directory a ``resume=`` value names: the directory itself, or the run whose ``checkpoints/``
    holds that file; None for a checkpoint file elsewhere (that run gets a new directory)."""
    path = Path(resume).expanduser().resolve()
    if not path.is_file():
        return path
    return path.parent.parent if path.parent.name == LAST_CHECKPOINT.parent.name else None


def expand_resume_argv(argv: Sequence[str]) -> list[str]:
    """Turn ``resume=<run dir>`` into the overrides that recreate that run in that directory: the original
    ones, then the new command line's (which win), then ``hydra.run.dir`` unless given. Idempotent, because
    DDP re-runs train.py with the expanded argv."""
    argv = list(argv)
    values = [arg.split("=", 1)[1] for arg in argv if _override_key(arg) == "resume" and "=" in arg]
    if not values or values[-1] in ("", "null", "None"):
        return argv
    if any(arg in ("-m", "--multirun") for arg in argv):
        raise ResumeError(
            "resume=<run dir> resumes a single run; to resume a sweep, rerun the same command with the same "
            "hydra.sweep.dir and every job continues from its own checkpoints/last.ckpt"
        )
    run_dir = run_dir_of(values[-1])
    if run_dir is None:
        return argv
    if not run_dir.is_dir():
        raise ResumeError(f"resume={values[-1]}: no run directory at {run_dir}")
    given = {_override_key(arg) for arg in argv if "=" in arg or arg.startswith("~")}
    original_file = run_dir / ".hydra" / "overrides.yaml"
    original = (yaml.safe_load(original_file.read_text()) if original_file.is_file() else None) or []

    def covered(arg: str) -> bool:  # ``model`` on the new command line covers the original's ``model.x``
        return any(_override_key(arg) == key or _override_key(arg).startswith(key + ".") for key in given)

    replayed = [arg for arg in original if not covered(arg)]
    run_dir_arg = [] if "hydra.run.dir" in given else [f"hydra.run.dir={run_dir}"]
    return [*replayed, *argv, *run_dir_arg]


def resume_checkpoint(resume: str | None, out_dir: Path, config: dict[str, Any] | None = None) -> Path | None:
    """``resume``'s checkpoint (a run directory or a checkpoint file), else this run directory's own
    ``checkpoints/last.ckpt`` when it is being reused, else None. With ``config`` (this run's resolved
    config), a checkpoint in ``out_dir`` must come from the same run (:func:`check_same_run`)."""
    if resume:
        path = Path(resume).expanduser().resolve()
        checkpoint = path if path.is_file() else path / LAST_CHECKPOINT
        if not checkpoint.is_file():
            raise MissingCheckpointError(
                f"resume={resume}: no checkpoint at {checkpoint}; the run stopped before its first "
                f"checkpoint (one is written at every validation, every trainer.val_check_interval steps), "
                f"so start it again without resume="
            )
    else:
        checkpoint = out_dir / LAST_CHECKPOINT
        if not checkpoint.is_file():
            return None
    if config is not None:
        check_same_run(checkpoint, out_dir, config)
    return checkpoint


def check_same_run(checkpoint: Path, out_dir: Path, config: dict[str, Any]) -> None:
    """Refuse to continue ``checkpoint`` when ``config`` changes a RUN_DEFINING_KEYS entry of the run
    directory's ``config_resolved.yaml``; training length, logging and hardware may change."""
    saved_file = out_dir / "config_resolved.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    # A run directory written before the model node's layout changed still continues.
    saved, config = ({**tree, "model": recorded_model(tree)} for tree in (saved, config))

    def pick(tree: Any, dotted: str) -> Any:
        for part in dotted.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    changed = [key for key in RUN_DEFINING_KEYS if pick(saved, key) != pick(config, key)]
    if changed:
        raise ResumeError(
            f"{out_dir} holds a checkpoint ({checkpoint.name}) of a run with a different "
            f"{', '.join(changed)}; pass the original values to continue it (resume={out_dir} alone "
            f"replays them), or use a new run directory (another hydra.run.dir) to start a different run"
        )


def wandb_run_id(out_dir: Path) -> str:
    """This run directory's W&B run id, created on first use so that a resumed run logs to the same run."""
    path = out_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # any short id, unique within the project
    atomic_write_text(path, run_id + "\n")
    return run_id


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary sibling, flushed, then renamed into place: a kill while saving
    leaves the previous ``last.ckpt`` intact, and the next save removes the leftover ``.<name>.tmp-*``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = temporary_sibling(final)
        try:
            with open(tmp, "xb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
