"""Small helpers that keep train.py a straight read: profile choice, model assembly, validation."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from data.base import LRADataModule
from lra.resume import wandb_run_id
from models.attention.base import Attention
from models.encoder import LRAEncoder
from models.heads import LRAModel

MODEL_KEYS_NOT_FOR_ENCODER = ("attn_dropout", "retrieval_interaction")
# Trainer-level settings of the harness itself, kept under ``trainer`` but not passed to Lightning's Trainer.
HARNESS_TRAINER_KEYS = ("max_nonfinite_steps",)


def default_profile_override(argv: Sequence[str]) -> str | None:
    """``profile=cpu`` when no CUDA device is present and the command line chose no profile."""
    chose = any(arg.split("=", 1)[0].lstrip("+~") == "profile" for arg in argv)
    if chose or torch.cuda.is_available():
        return None
    return "profile=cpu"


def profile_banner(profile: str) -> str:
    if profile == "cpu":
        return (
            "Profile: cpu (reduced recipe: smaller model, fewer steps, subsampled evaluation; no CUDA "
            "device found). Pass profile=official for the task's official recipe."
        )
    return f"Profile: {profile} (the task's recipe as configured). Pass profile=cpu for a quick CPU run."


def run_banner(
    config: dict[str, Any],
    choices: Any,
    trainer: Any,
    loggers: list[Any],
    out_dir: Path,
    ckpt_path: Path | None,
) -> str:
    """The few lines printed at the start of a run (the full config is in ``config_resolved.yaml``).

    Args:
        config: the resolved config.
        choices: Hydra's ``runtime.choices`` (which attention, profile were chosen).
        trainer: the Lightning Trainer (device, precision, world size).
        loggers: the instantiated loggers.
        out_dir: the run directory.
        ckpt_path: the checkpoint the run continues from, if any.
    """
    from lra.summary import device_name

    model, data, trainer_cfg = config["model"], config["data"], config["trainer"]
    lr = float(config["optim"]["lr"])
    fast = trainer_cfg.get("fast_dev_run")
    steps = f"fast_dev_run ({int(fast)} batch per split)" if fast else f"{trainer_cfg['max_steps']} steps"
    options = ", ".join(
        f"{key}={value}" for key, value in config["attention"].items() if key not in ("_target_", "_partial_")
    )
    device = str(trainer.strategy.root_device)
    # device_name() already starts with "cpu: " on a CPU.
    where = device_name() if device == "cpu" else f"{device} ({device_name()})"
    if trainer.world_size > 1:
        where += f" x {trainer.world_size} processes"
    lines = [
        f"== {config['task']['name']} / {choices.attention} (seed {config['seed']}) ==",
        profile_banner(choices.profile),
        f"  attention  {choices.attention}: {options or 'defaults'}",
        f"  model      {model['n_layers']} layers, d_model {model['d_model']}, {model['num_heads']} heads, "
        f"mlp {model['mlp_dim']}, pooling {model['pooling']}",
        f"  training   {steps}, batch {data['batch_size']}, lr {lr:g} "
        f"({config['scheduler']['name']}), precision {trainer.precision} on {where}",
        f"  loggers    {logger_description(loggers)}",
        f"  run dir    {out_dir}" + (f" (Resuming from {ckpt_path})" if ckpt_path else ""),
    ]
    return "\n".join(lines)


def data_banner(described: dict[str, Any]) -> str:
    """The banner's data line, once the data is loaded: source, length and split sizes."""
    sizes = " / ".join(f"{split} {size:,}" for split, size in described["sizes"].items())
    return f"  data       {described['source']}, seq_len {described['seq_len']}, {sizes}"


def logger_description(loggers: list[Any]) -> str:
    """W&B's mode (and project) or the other loggers, for the banner."""
    parts = []
    for logger in loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            mode = os.environ.get("WANDB_MODE", "online")
            parts.append(f"W&B {mode} (project {logger.name or 'lra'})")
        else:
            parts.append(name.removesuffix("Logger"))
    return ", ".join(parts) or "none (summary.json only)"


def build_model(
    model_cfg: DictConfig, attention: Callable[..., Attention], datamodule: LRADataModule
) -> LRAModel:
    """The encoder plus the head the task needs (dual encoder when the data module is two-document)."""
    sizes = {
        key: value
        for key, value in OmegaConf.to_container(model_cfg, resolve=True).items()
        if key not in MODEL_KEYS_NOT_FOR_ENCODER
    }
    encoder = LRAEncoder(
        attention=attention, vocab_size=datamodule.vocab_size, seq_len=datamodule.seq_len, **sizes
    )
    return LRAModel(
        encoder,
        num_classes=datamodule.num_classes,
        mlp_dim=model_cfg.mlp_dim,
        d_model=model_cfg.d_model,
        dual=datamodule.dual,
        retrieval_interaction=model_cfg.retrieval_interaction,
    )


def instantiate_each(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def lightning_trainer_config(trainer_cfg: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """Split ``trainer`` into the Lightning Trainer's arguments and the harness's own trainer-level keys."""
    lightning_cfg = trainer_cfg.copy()
    with open_dict(lightning_cfg):
        harness = {key: lightning_cfg.pop(key) for key in HARNESS_TRAINER_KEYS if key in lightning_cfg}
    return lightning_cfg, harness


def instantiate_loggers(group: DictConfig | None, out_dir: Path) -> list[Any]:
    """Like :func:`instantiate_each`; W&B logs to this run directory's run id (``resume="allow"``), so a
    resumed run continues the same W&B run."""
    loggers = []
    for node in (group or {}).values():
        if node is None or "_target_" not in node:
            continue
        if node._target_.endswith("WandbLogger"):
            # Only rank 0 talks to W&B; other ranks must not race it to create the id file.
            run_id = wandb_run_id(out_dir) if rank_zero_only.rank == 0 else None
            logger = instantiate(node, id=run_id, resume="allow")
            # Lightning always passes anonymous=None to wandb.init, and recent wandb warns at every run that
            # the setting has no effect; leaving the key out is the same request without the warning.
            init_kwargs = getattr(logger, "_wandb_init", {})
            if "anonymous" in init_kwargs and init_kwargs["anonymous"] is None:
                del init_kwargs["anonymous"]
            loggers.append(logger)
        else:
            loggers.append(instantiate(node))
    return loggers


def reproduce_command(overrides: Sequence[str]) -> str:
    """The command line that reruns this configuration (the task overrides Hydra recorded)."""
    return "python " + shlex.join(["train.py", *overrides])


def without_logger_callbacks(callbacks: list[Any], loggers: list[Any]) -> list[Any]:
    """Drop callbacks that only feed a logger (LearningRateMonitor) when ``logger=none``."""
    if loggers:
        return callbacks
    return [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]


def default_wandb_mode() -> None:
    """W&B works without an account: offline unless the user chose a mode."""
    # A sweep agent's runs must reach the sweep's project, so they keep W&B's own default (online).
    if "WANDB_SWEEP_ID" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")


def log_run_config(loggers: list[Any], config: dict[str, Any], attention: str, profile: str) -> None:
    """Log the resolved config, plus what identifies the run, to every logger."""
    from lra.summary import device_name, git_commit

    extra = {"attention_name": attention, "profile": profile, "git_commit": git_commit()}
    extra["device"] = device_name()
    for logger in loggers:
        logger.log_hyperparams({**config, **extra})


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run lines on the console: accuracies, throughput, memory, where the files are."""
    metrics, perf = summary["metrics"], summary["perf"]
    print(f"\n== {summary['task']} / {summary['attention']} (profile {summary['profile']}) ==")
    for key in ("val/acc", "val/acc_best", "test/acc", "test/acc_at_best_val"):
        if key in metrics:
            print(f"  {key:22s} {metrics[key]:.4f}")
    for key, unit in (("steps_per_s", "steps/s"), ("tokens_per_s", "tokens/s"), ("peak_mem_gb", "GB")):
        if key in perf:
            print(f"  {key:22s} {perf[key]:.4g} {unit}")
    print(f"  wall time              {summary['wall_time_s']:.0f} s")
    print(
        f"  run files              {summary['output_dir']} (summary.json, config_resolved.yaml, checkpoints)"
    )
