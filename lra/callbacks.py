"""Throughput and peak-memory callbacks, identical for every attention so runs compare directly; the
clock and process-memory counters are ``lra/timing.py``'s, shared with the efficiency benchmark."""

from __future__ import annotations

import gc
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lra.timing import process_peak_rss_gb, process_rss_gb, reset_process_peak_rss, synchronize


class ThroughputMonitor(L.Callback):
    """``perf/{steps,samples,tokens}_per_s`` and ``perf/step_ms`` without the first ``warmup_steps`` and
    validation; tokens are padded tokens, both documents for Retrieval. The device is synchronised only when
    timing starts and when a value is logged. Under DDP every rank takes equal batches (distributed sampler,
    ``drop_last``), so samples and tokens are this rank's times the world size.

    Also ``time/elapsed_s`` at every validation: wall clock since training started, evaluation included,
    the x-axis of the accuracy-against-time curves.
    """

    def __init__(self, warmup_steps: int = 5) -> None:
        self.warmup_steps = warmup_steps
        self.started: float | None = None
        self.train_started: float | None = None
        self.paused_at: float | None = None
        self.excluded, self.steps, self.samples, self.tokens, self.world_size = 0.0, 0, 0, 0, 1
        self.summary: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.world_size = trainer.world_size
        self.train_started = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.train_started is not None and not trainer.sanity_checking:
            pl_module.log("time/elapsed_s", time.perf_counter() - self.train_started)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.started is None:
            if trainer.global_step >= self.warmup_steps:
                synchronize(pl_module.device)
                self.started = time.perf_counter()
            return
        self.steps += 1
        self.samples += int(batch["label"].shape[0])
        self.tokens += sum(int(batch[key].numel()) for key in ("input_ids", "input_ids_2") if key in batch)
        if self.steps % max(1, trainer.log_every_n_steps) == 0:
            synchronize(pl_module.device)
            self._update()
            pl_module.log_dict({f"perf/{key}": value for key, value in self.summary.items()})

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.started is not None and not trainer.sanity_checking:
            synchronize(pl_module.device)
            self.paused_at = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.paused_at is not None:
            synchronize(pl_module.device)
            self.excluded += time.perf_counter() - self.paused_at
            self.paused_at = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._update()

    def _update(self) -> None:
        if self.started is None or self.steps == 0:
            return
        elapsed = max(time.perf_counter() - self.started - self.excluded, 1e-9)
        self.summary = {
            "steps_per_s": self.steps / elapsed,
            "samples_per_s": self.world_size * self.samples / elapsed,
            "tokens_per_s": self.world_size * self.tokens / elapsed,
            "step_ms": 1000.0 * elapsed / self.steps,
            "timed_steps": float(self.steps),
            "world_size": float(self.world_size),
        }


class PeakMemoryMonitor(L.Callback):
    """``perf/peak_mem_gb``: CUDA peak allocated memory on a GPU, the process peak RSS on a CPU.

    On a CPU the peak counts from the start of training (the counter is reset there, on Linux), so jobs of a
    multirun do not inherit each other's peaks; ``rss_at_train_start_gb`` was already resident then.
    """

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self._cpu_extra: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            return
        gc.collect()
        since_train_start = reset_process_peak_rss()
        self._cpu_extra = {
            # cumulative: the counter could not be reset (not Linux), earlier jobs of a multirun included
            "peak_mem_kind": "process_peak_rss" if since_train_start else "process_peak_rss_cumulative",
            "rss_at_train_start_gb": process_rss_gb(),
        }

    def _measure(self, pl_module: L.LightningModule, log: bool = True) -> None:
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 1024**3
            self.summary = {"peak_mem_gb": peak, "peak_mem_kind": "cuda_max_allocated"}
        else:
            kind = "process_peak_rss_cumulative"
            self.summary = {"peak_mem_gb": process_peak_rss_gb(), "peak_mem_kind": kind, **self._cpu_extra}
        if log:  # under DDP the largest rank's peak, the one that decides whether a run fits
            pl_module.log("perf/peak_mem_gb", self.summary["peak_mem_gb"], sync_dist=True, reduce_fx="max")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._measure(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(pl_module, log=False)


class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``, overwritten after every validation and at the end of training: what
    ``resume=<run dir>`` continues from. Lightning's ``save_last`` writes only when val/acc improved, so a
    killed run would lose everything since its last improvement.
    """

    def __init__(self, dirpath: str, **kwargs: Any) -> None:
        fixed = {"monitor": None, "save_top_k": 1, "filename": "last", "enable_version_counter": False}
        super().__init__(dirpath=dirpath, **(fixed | kwargs))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))
