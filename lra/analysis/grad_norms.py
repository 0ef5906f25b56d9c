"""Per-layer gradient norms of the attention inputs q, k, v (``python train.py callbacks=grad_norms``).

Checks the bounded-gradient claim of Fastmax (Gerami et al. 2024) and TaylorShift (Nauen et al. 2024);
``python -m lra.analysis.gradients`` compares the attentions. Off the logged steps a forward pre-hook returns
at once; on a logged step each input gets a tensor hook whose squared norm stays on the device until the
step ends (one host sync per logged step).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from lra.analysis.capture import add_attention_pre_hooks
from models.attention.base import Attention


class AttentionGradNorms(L.Callback):
    """Log ``grad_norm/layer<i>/{q,k,v}``, the whole-batch L2 norm of dL/dq, dL/dk, dL/dv at the input of
    layer i's attention, on steps where ``global_step % every_n_steps == 0`` (step 0 included).

    With fp16 gradient scaling the norms are divided by the loss scale, which is logged as ``loss_scale``
    (an inf norm at a scale the GradScaler then lowers is its overflow probe, not a diverging model). A dual
    encoder calls each layer twice per step: both calls add to the norm. ``history`` keeps one dict per
    logged step, ``{"step": s, "layer0/q": norm, ...}``.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ValueError(f"AttentionGradNorms: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.history: list[dict[str, float]] = []
        self._handles: list = []
        self._active = False
        self._step = 0
        self._squares: dict[str, Tensor] = {}
        self._scale = 1.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._handles:
            self._handles = add_attention_pre_hooks(pl_module.model.encoder, self._on_attention_call)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step
        self._active = self._step % self.every_n_steps == 0
        self._squares = {}
        # The scaler changes its scale only in update(), after this batch's backward and optimiser step.
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self._scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _on_attention_call(
        self, layer: int, module: Attention, q: Tensor, k: Tensor, v: Tensor, mask=None
    ) -> None:
        if not (self._active and module.training and torch.is_grad_enabled()):
            return
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            if tensor.requires_grad:
                tensor.register_hook(lambda grad, key=f"layer{layer}/{name}": self._record(key, grad))

    def _record(self, key: str, grad: Tensor) -> None:
        square = grad.detach().float().square().sum()
        self._squares[key] = self._squares.get(key, 0) + square

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or not self._squares:
            return
        self._active = False
        keys = sorted(self._squares)
        norms = torch.stack([self._squares[key] for key in keys]).sqrt() / self._scale
        values = dict(zip(keys, norms.tolist(), strict=True))
        self.history.append({"step": float(self._step), **values})
        logged = {f"grad_norm/{key}": value for key, value in values.items()}
        if self._scale != 1.0:
            logged["loss_scale"] = self._scale
        # Straight to the loggers: self.log would keep only steps that are multiples of log_every_n_steps.
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=self._step)
