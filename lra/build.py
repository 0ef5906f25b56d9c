"""Small helpers that keep train.py a straight read: profile choice, model assembly, console lines."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from data.base import LRADataModule
from lra.resume import wandb_run_id
from lra.summary import MODEL_TARGET, device_name
from models.attention.base import Attention
from models.heads import LRAModel


def default_profile_override(argv: Sequence[str]) -> str | None:
    """``profile=cpu`` when no CUDA device is present and the command line chose no profile."""
    chose = any(arg.split("=", 1)[0].lstrip("+~") == "profile" for arg in argv)
    return None if chose or torch.cuda.is_available() else "profile=cpu"


def run_banner(
    config: dict[str, Any],
    choices: Any,
    trainer: Any,
    loggers: list[Any],
    out_dir: Path,
    ckpt_path: Path | None,
) -> str:
    """The few lines printed at the start of a run (the full config is in ``config_resolved.yaml``);
    ``choices`` is Hydra's ``runtime.choices``."""
    model, data, trainer_cfg = config["model"], config["data"], config["trainer"]
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
    recipe, other = ("the task's recipe as configured", "cpu for a quick CPU run")
    if choices.profile == "cpu":
        recipe = "reduced recipe: smaller model, fewer steps, subsampled evaluation; no CUDA device found"
        other = "official for the task's official recipe"
    logged = [
        f"W&B {os.environ.get('WANDB_MODE', 'online')} (project {logger.name or 'lra'})"
        if type(logger).__name__ == "WandbLogger"
        else type(logger).__name__.removesuffix("Logger")
        for logger in loggers
    ]
    lines = [
        f"== {config['task']['name']} / {choices.attention} (seed {config['seed']}) ==",
        f"Profile: {choices.profile} ({recipe}). Pass profile={other}.",
        f"  attention  {choices.attention}: {options or 'defaults'}",
        f"  model      {model['n_layers']} layers, d_model {model['d_model']}, {model['num_heads']} heads, "
        f"mlp {model['mlp_dim']}, pooling {model['pooling']}",
        f"  training   {steps}, batch {data['batch_size']}, lr {float(config['optim']['lr']):g} "
        f"({config['scheduler']['name']}), precision {trainer.precision} on {where}",
        f"  loggers    {', '.join(logged) or 'none (summary.json only)'}",
        f"  run dir    {out_dir}" + (f" (Resuming from {ckpt_path})" if ckpt_path else ""),
    ]
    return "\n".join(lines)


def build_model(
    model_cfg: DictConfig, attention: Callable[..., Attention], datamodule: LRADataModule
) -> LRAModel:
    """The ``model`` node's constructor (``LRAModel``), completed with the attention and what only the data
    module knows: vocabulary, length, classes, and whether examples are document pairs."""
    if "_target_" not in model_cfg:  # the config_resolved.yaml of a run older than the _target_ of this node
        legacy = {key: value for key, value in model_cfg.items() if key != "attn_dropout"}
        model_cfg = OmegaConf.create({"_target_": MODEL_TARGET, **legacy})
    return instantiate(
        model_cfg,
        attention=attention,
        vocab_size=datamodule.vocab_size,
        seq_len=datamodule.seq_len,
        num_classes=datamodule.num_classes,
        dual=datamodule.dual,
    )


def instantiate_each(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def instantiate_loggers(group: DictConfig | None, out_dir: Path) -> list[Any]:
    """Like :func:`instantiate_each`, but W&B logs to this run directory's run id (``resume="allow"``), so a
    resumed run continues the same W&B run."""
    loggers = []
    for node in (group or {}).values():
        if node is None or "_target_" not in node:
            continue
        if not node._target_.endswith("WandbLogger"):
            loggers.append(instantiate(node))
            continue
        # Only rank 0 talks to W&B; other ranks must not race it to create the id file.
        logger = instantiate(
            node, id=wandb_run_id(out_dir) if rank_zero_only.rank == 0 else None, resume="allow"
        )
        # Lightning passes anonymous=None to wandb.init, which recent wandb warns about at every run.
        init_kwargs = getattr(logger, "_wandb_init", {})
        if "anonymous" in init_kwargs and init_kwargs["anonymous"] is None:
            del init_kwargs["anonymous"]
        loggers.append(logger)
    return loggers


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
