"""LRAClassifier: the LightningModule shared by every task and attention."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lra.schedules import lr_multiplier
from models.heads import LRAModel

INPUT_KEYS = ("input_ids", "mask", "input_ids_2", "mask_2")


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a data batch that ``LRAModel.forward`` takes."""
    return {key: batch[key] for key in INPUT_KEYS if key in batch}


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients were non-finite for more steps than allowed."""


class LRAClassifier(L.LightningModule):
    """Cross-entropy classification with accuracy per stage. ``optimizer`` is a partial optimiser (``optim``),
    ``scheduler`` holds ``lr_multiplier``'s arguments; ``reproduce`` is quoted in the non-finite error."""

    def __init__(
        self,
        model: LRAModel,
        optimizer: Callable[..., Optimizer],
        scheduler: Mapping[str, Any],
        num_classes: int,
        max_nonfinite_steps: int = 0,
        reproduce: str = "",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer", "reproduce"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_config = dict(scheduler)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.reproduce = reproduce
        self.nonfinite_steps = 0
        self.rng_to_restore: dict[str, Any] | None = None
        metrics = MetricCollection({"acc": MulticlassAccuracy(num_classes=num_classes, average="micro")})
        # ModuleDict keys may not shadow Module attributes such as .train, hence the suffix.
        self.metrics = torch.nn.ModuleDict(
            {f"{stage}_metrics": metrics.clone(prefix=f"{stage}/") for stage in ("train", "val", "test")}
        )
        self.val_acc_best = MaxMetric()
        # Checkpointed so that a run resumed mid-epoch ends with the same epoch accuracy and best val/acc.
        self.metrics["train_metrics"].persistent(True)
        self.val_acc_best.persistent(True)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        longest = max(batch[key].shape[1] for key in ("input_ids", "input_ids_2") if key in batch)
        if longest + int(self.model.encoder.use_cls) > self.model.encoder.max_len:
            raise ValueError(
                f"input of {longest} tokens, but the model was built for data.seq_len="
                f"{self.model.encoder.max_len - int(self.model.encoder.use_cls)} (positions and fixed-length "
                f"attentions such as Linformer hold that many); pad/truncate the data to data.seq_len or "
                f"build the model with the data's length"
            )
        return self.model(**model_inputs(batch))

    def _step(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["label"])
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits.detach(), batch["label"])
        train, batch_size = stage == "train", batch["label"].shape[0]
        # Evaluation losses are averaged over every rank's examples; the training loss is rank 0's, per step.
        kwargs = {"prog_bar": True, "batch_size": batch_size}
        self.log(f"{stage}/loss", loss, on_step=train, on_epoch=not train, sync_dist=not train, **kwargs)
        self.log_dict(metrics, on_step=False, on_epoch=True, **kwargs)
        return loss

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        loss = self._step(batch, "train")
        # Under DDP every rank must skip together (a lone rank without backward would hang the others).
        if self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            return loss
        culprit = next((name for name, p in self.named_parameters() if not torch.isfinite(p).all()), None)
        where = f"parameter {culprit!r} is already non-finite" if culprit else "all parameters finite"
        ranks = " on this or another rank" if self.trainer.world_size > 1 else ""
        self._count_nonfinite(
            f"non-finite training loss ({loss.item()}){ranks} at batch {batch_idx}: {where}"
        )
        return None  # Lightning skips the backward pass and the optimiser step

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # fp16 loss scaling: the GradScaler skips overflowing steps and lowers the scale by itself.
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads or torch.stack([g.isfinite().all() for g in grads]).all():  # one device sync per step
            return
        name, param = next(
            (n, p) for n, p in self.named_parameters() if p.grad is not None and not p.grad.isfinite().all()
        )
        groups = optimizer.param_groups
        group = next((i for i, g in enumerate(groups) if any(p is param for p in g["params"])), -1)
        bad = int((~param.grad.isfinite()).sum())
        self._count_nonfinite(
            f"non-finite gradient in parameter {name!r} ({bad} of {param.grad.numel()} entries; optimizer "
            f"param group {group}, lr {optimizer.param_groups[group]['lr']:.3g})"
        )
        optimizer.zero_grad(set_to_none=True)  # without gradients the optimiser skips the step

    def _count_nonfinite(self, what: str) -> None:
        self.nonfinite_steps += 1
        if self.nonfinite_steps <= self.max_nonfinite_steps:
            rank_zero_warn(f"{what} at step {self.global_step}: skipping the step", category=RuntimeWarning)
            return
        raise NonFiniteLossError(
            f"{what} at step {self.global_step} (epoch {self.current_epoch}); {self.nonfinite_steps} "
            f"non-finite step(s) in this run, {self.max_nonfinite_steps} allowed "
            f"(trainer.max_nonfinite_steps).\n"
            f"  reproduce: {self.reproduce or 'the config_resolved.yaml in the run directory'}\n"
            f"  to fix: lower optim.lr, set trainer.gradient_clip_val=1.0, train with "
            f"trainer.precision=32-true, or skip a few bad steps with trainer.max_nonfinite_steps=N"
        )

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best.update(self.metrics["val_metrics"]["acc"].compute())
        # The same on every rank (a synced metric, DDP-synced parameters); sync_dist tells Lightning so.
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)
        for layer, attention in enumerate(self.model.encoder.attentions):
            for key, value in attention.log_values().items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self.log(f"attention/layer{layer}/{key}", float(value), sync_dist=True)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameters())
        scheduler = LambdaLR(optimizer, lr_multiplier(**self.scheduler_config))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout and random-feature redraws draw from torch's generators; a resumed run continues their
        # streams so that it follows the uninterrupted run step for step.
        checkpoint["rng_states"] = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        self.rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Restored here, after Lightning has built the data iterators (which draw from the same generator).
        if self.rng_to_restore is not None:
            torch.set_rng_state(self.rng_to_restore["cpu"])
            if self.rng_to_restore["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self.rng_to_restore["cuda"])
            self.rng_to_restore = None
