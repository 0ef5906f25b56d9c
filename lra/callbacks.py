"""Throughput and peak-memory callbacks, identical for every attention so runs compare directly.

The clocks and memory counters are ``lra/timing.py``'s, the ones the efficiency benchmark reads."""

from __future__ import annotations

import gc
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lra.timing import (
    peak_allocated,
    process_peak_rss_gb,
    process_rss_gb,
    reset_peak_allocated,
    reset_process_peak_rss,
    synchronize,
)


class ThroughputMonitor(L.Callback):
    """Training steps/s, samples/s and tokens/s, excluding the first ``warmup_steps`` and validation time.

    Logs ``perf/steps_per_s``, ``perf/samples_per_s``, ``perf/tokens_per_s`` (padded tokens the model
    processes, both documents for Retrieval) and ``perf/step_ms``, and ``time/elapsed_s`` (wall clock since
    training started, evaluation included) at every validation. The device is synchronised only when
    timing starts and when a value is logged. Under DDP every rank takes the same number of equal-sized
    batches per step (distributed sampler, ``drop_last``), so samples and tokens are this rank's times the
    world size: the throughput of the whole job.
    """

    def __init__(self, warmup_steps: int = 5) -> None:
        self.warmup_steps = warmup_steps
        self.started: float | None = None
        self.train_started: float | None = None
        self.paused_at: float | None = None
        self.excluded = 0.0
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.world_size = 1
        self.summary: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.world_size = trainer.world_size
        self.train_started = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Wall-clock seconds since training started, validation included, beside each val/acc: the
        # x-axis of the accuracy-against-time curves (steps/s alone would leave evaluation out).
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
    multirun do not inherit each other's peaks; ``rss_at_train_start_gb`` is what was already resident then
    (libraries, data, and whatever earlier jobs of the same process left behind).
    """

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self._cpu_extra: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            reset_peak_allocated(pl_module.device)
            return
        gc.collect()
        since_train_start = reset_process_peak_rss()
        self._cpu_extra = {
            # process_peak_rss_cumulative: the counter could not be reset (not Linux); the peak is the
            # process's since it started, earlier jobs of a multirun included.
            "peak_mem_kind": "process_peak_rss" if since_train_start else "process_peak_rss_cumulative",
            "rss_at_train_start_gb": process_rss_gb(),
        }

    def _measure(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            peak = peak_allocated(pl_module.device) / 1024**3
            self.summary = {"peak_mem_gb": peak, "peak_mem_kind": "cuda_max_allocated"}
        else:
            self.summary = {
                "peak_mem_gb": process_peak_rss_gb(),
                "peak_mem_kind": "process_peak_rss_cumulative",
                **self._cpu_extra,
            }

    def _log(self, pl_module: L.LightningModule) -> None:
        # Under DDP: the largest rank's peak, the one that decides whether a run fits.
        pl_module.log("perf/peak_mem_gb", self.summary["peak_mem_gb"], sync_dist=True, reduce_fx="max")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(pl_module)
        self._log(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._measure(pl_module)
            self._log(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(pl_module)


class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``: the latest state after every validation and at the end of training.

    Lightning's ``save_last`` follows the best checkpoint (it writes only when val/acc improved), so a killed
    run would lose everything since its last improvement; this one is overwritten every time. It is what
    ``resume=<run dir>`` continues from, and with the trainer's ``AtomicCheckpointIO`` a kill while it is
    written leaves the previous one intact. Extra ``ModelCheckpoint`` arguments (``every_n_train_steps``)
    pass through.
    """

    def __init__(self, dirpath: str, **kwargs: Any) -> None:
        fixed = {"monitor": None, "save_top_k": 1, "filename": "last", "enable_version_counter": False}
        super().__init__(dirpath=dirpath, **(fixed | kwargs))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))
