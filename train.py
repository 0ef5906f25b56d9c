"""Train and evaluate a Transformer on an LRA task with a chosen attention.

python train.py attention=taylorshift task=listops
python train.py -m attention=softmax,performer task=image seed=0,1,2
python train.py resume=outputs/listops/taylorshift/<time>     # continue a killed run where it stopped
python train.py --help                                        # attentions, tasks, profiles, common overrides

Mistakes that are the user's to fix (lra.errors.UserError) print their message without a traceback;
HYDRA_FULL_ERROR=1 shows it.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict

from data.cache import atomic_write_text
from lra.build import build_model, instantiate_each, instantiate_loggers, print_summary, run_banner
from lra.cli import command_line, quiet_library_noise, register_resolvers
from lra.errors import run_cli
from lra.module import LRAClassifier
from lra.resume import resume_checkpoint
from lra.summary import device_name, git_commit, versions, write_summary
from lra.validate import validate_config


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    started = time.time()
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    out_dir = Path(cfg.paths.output_dir)
    for warning in validate_config(cfg):
        rank_zero_warn(warning)
    config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = resume_checkpoint(cfg.resume, out_dir, config)

    trainer_cfg = cfg.trainer.copy()
    with open_dict(trainer_cfg):  # the harness's own key, not a Lightning Trainer argument
        max_nonfinite_steps = trainer_cfg.pop("max_nonfinite_steps", 0)
    loggers = instantiate_loggers(cfg.logger, out_dir)
    callbacks = instantiate_each(cfg.callbacks)
    if not loggers:  # logger=none: nothing for the LearningRateMonitor to feed
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        print(run_banner(config, choices, trainer, loggers, out_dir, ckpt_path), flush=True)
        atomic_write_text(out_dir / "config_resolved.yaml", OmegaConf.to_yaml(config))

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if trainer.is_global_zero:
        described = datamodule.describe()
        sizes = " / ".join(f"{split} {size:,}" for split, size in described["sizes"].items())
        print(f"  data       {described['source']}, seq_len {described['seq_len']}, {sizes}", flush=True)
    L.seed_everything(cfg.seed, workers=True)
    attention = instantiate(cfg.attention)
    model = build_model(cfg.model, attention, datamodule)
    module = LRAClassifier(
        model,
        optimizer=instantiate(cfg.optim),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        num_classes=datamodule.num_classes,
        max_nonfinite_steps=max_nonfinite_steps,
        reproduce="python " + shlex.join(["train.py", *hydra_cfg.overrides.task]),
    )
    identity = {"git_commit": git_commit(), "device": device_name()}
    logged = {**config, "attention_name": choices.attention, "profile": choices.profile, **identity}
    for logger in loggers:
        logger.log_hyperparams(logged)

    summary = {
        "task": cfg.task.name,
        "attention": choices.attention,
        "profile": choices.profile,
        "seed": cfg.seed,
        "status": "running",
        "output_dir": str(out_dir),
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "world_size": trainer.world_size,
        **identity,
        "versions": versions(),
        "config": config,
    }
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.eval.checkpoint == "best_val" and not best_path:
            raise RuntimeError("eval.checkpoint=best_val needs a best checkpoint, but none was saved")
        # Official LRA tests the last weights: those are the ones in memory after fit.
        test_ckpt = best_path if cfg.eval.checkpoint == "best_val" else None
        metrics.update(trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)[0])
        if cfg.eval.checkpoint == "last" and best_path:
            at_best = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)[0]
            metrics["test/acc_at_best_val"] = at_best["test/acc"]
            # The second test logged its own test/acc; log the official one last so loggers keep it.
            official = {key: metrics[key] for key in ("test/acc", "test/acc_at_best_val")}
            for logger in loggers:
                logger.log_metrics(official, step=trainer.global_step)
        summary["status"] = "completed"
    except BaseException as error:
        summary["status"] = f"failed: {type(error).__name__}: {error}"
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        raise
    finally:
        summary.update(
            metrics=metrics,
            global_step=trainer.global_step,
            wall_time_s=time.time() - started,
            # Decides between two runs of one results cell; file times do not survive a copy or a clone.
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            data=datamodule.describe(),
            attention_values=[a.log_values() for a in model.encoder.attentions],
            perf={key: value for c in callbacks for key, value in getattr(c, "summary", {}).items()},
        )
        if trainer.is_global_zero:
            write_summary(out_dir / "summary.json", summary)
        if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
            import wandb

            wandb.finish()
    if trainer.is_global_zero:
        print_summary(summary)
    return float(metrics.get("val/acc_best", 0.0))


if __name__ == "__main__":
    # W&B works without an account: offline unless chosen; a sweep agent's runs must reach its project.
    if "WANDB_SWEEP_ID" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")
    quiet_library_noise()
    register_resolvers()
    # Before Hydra parses it: resume= expanded, profile=cpu without CUDA, Hydra's options after the overrides.
    sys.argv[1:] = run_cli(lambda: command_line(sys.argv[1:]), prog="train.py")
    main()
