"""Train and evaluate a Transformer on an LRA task with a chosen attention.

python train.py attention=taylorshift task=listops
python train.py -m attention=softmax,performer task=image seed=0,1,2
python train.py resume=outputs/listops/taylorshift/<time>     # continue a killed run where it stopped
python train.py --help                                        # attentions, tasks, profiles, common overrides

Mistakes that are the user's to fix (lra.errors.UserError) print their message without a traceback;
HYDRA_FULL_ERROR=1 shows it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from data.cache import atomic_write_text
from lra.build import (
    build_model,
    data_banner,
    default_wandb_mode,
    instantiate_each,
    instantiate_loggers,
    lightning_trainer_config,
    log_run_config,
    print_summary,
    reproduce_command,
    run_banner,
    without_logger_callbacks,
)
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

    trainer_cfg, harness = lightning_trainer_config(cfg.trainer)
    loggers = instantiate_loggers(cfg.logger, out_dir)
    callbacks = without_logger_callbacks(instantiate_each(cfg.callbacks), loggers)
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        # A short banner; the whole config is in config_resolved.yaml (and `--cfg job` prints it).
        print(run_banner(config, choices, trainer, loggers, out_dir, ckpt_path), flush=True)
        atomic_write_text(out_dir / "config_resolved.yaml", OmegaConf.to_yaml(config))

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if trainer.is_global_zero:
        print(data_banner(datamodule.describe()), flush=True)
    L.seed_everything(cfg.seed, workers=True)
    attention = instantiate(cfg.attention)
    model = build_model(cfg.model, attention, datamodule)
    module = LRAClassifier(
        model,
        optimizer=instantiate(cfg.optim),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        num_classes=datamodule.num_classes,
        max_nonfinite_steps=harness.get("max_nonfinite_steps", 0),
        reproduce=reproduce_command(hydra_cfg.overrides.task),
    )
    log_run_config(loggers, config, attention=choices.attention, profile=choices.profile)

    summary = {
        "task": cfg.task.name,
        "attention": choices.attention,
        "profile": choices.profile,
        "seed": cfg.seed,
        "status": "running",
        "output_dir": str(out_dir),
        "resumed_from": str(ckpt_path) if ckpt_path else None,
        "world_size": trainer.world_size,
        "git_commit": git_commit(),
        "device": device_name(),
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
            for logger in loggers:
                logger.log_metrics(
                    {key: metrics[key] for key in ("test/acc", "test/acc_at_best_val")},
                    step=trainer.global_step,
                )
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
            data=datamodule.describe(),
            attention_values=[a.log_values() for a in model.encoder.attentions],
            perf={},
        )
        for callback in callbacks:
            summary["perf"].update(getattr(callback, "summary", {}))
        if trainer.is_global_zero:
            write_summary(out_dir / "summary.json", summary)
        if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
            import wandb

            wandb.finish()
    if trainer.is_global_zero:
        print_summary(summary)
    return float(metrics.get("val/acc_best", 0.0))


if __name__ == "__main__":
    default_wandb_mode()
    quiet_library_noise()
    register_resolvers()
    # Before Hydra parses the command line: resume=<run dir> becomes that run's overrides and run dir, the
    # CPU profile is chosen when there is no CUDA device, and Hydra's options go after the overrides (so
    # `--cfg job`, `--help`, `-m` work wherever they are written).
    sys.argv[1:] = run_cli(lambda: command_line(sys.argv[1:]), prog="train.py")
    main()
