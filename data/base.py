"""The shared LightningDataModule: cached token arrays in, uniform batches out.

Every task turns its source (official release, parquet, hub, or our generators) into arrays
``{split: {"input_ids": [N, L], "lengths": [N], "labels": [N]}}`` (plus ``input_ids_2``/``lengths_2`` for
the two-document Retrieval task). Those arrays are built once, cached under ``$LRA_DATA_DIR/cache`` and
memory-mapped afterwards. Batches are dicts ``{"input_ids", "mask", "label"}`` (plus ``_2`` keys), where
``mask`` is True at real (non-padding) positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.cache import ArraySplits, cached_arrays, params_key
from data.cache import data_root as default_data_root
from lra.errors import ConfigError, DataError, MissingDataError

SPLITS = ("train", "val", "test")
SHUFFLE_MODES = ("official", "full", "none")
# Seeds the evaluation subsample (data.max_eval_samples) and any training subsample (max_train_samples)
# independently of the run seed.
SUBSAMPLE_SEED = 0


class ArrayDataset(Dataset):
    """Examples from memory-mapped arrays; the mask is derived from the stored lengths."""

    def __init__(self, arrays: dict[str, np.ndarray], indices: np.ndarray | None = None) -> None:
        self.arrays = arrays
        self.indices = np.arange(len(arrays["labels"])) if indices is None else indices
        self.dual = "input_ids_2" in arrays

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        row = int(self.indices[item])
        example = {"label": torch.tensor(int(self.arrays["labels"][row]), dtype=torch.long)}
        suffixes = ("", "_2") if self.dual else ("",)
        for suffix in suffixes:
            ids = torch.from_numpy(np.asarray(self.arrays["input_ids" + suffix][row], dtype=np.int64))
            length = int(self.arrays["lengths" + suffix][row])
            example["input_ids" + suffix] = ids
            example["mask" + suffix] = torch.arange(ids.shape[0]) < length
        return example


class SeededSampler(Sampler[int]):
    """An order of ``num_examples`` indices that is a function of ``seed`` and the epoch set by Lightning."""

    def __init__(self, num_examples: int, seed: int) -> None:
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples


class BufferShuffleSampler(SeededSampler):
    """The official input order: a fixed base order read through a shuffle buffer of ``buffer_size`` units.

    A unit is one example (ListOps, Text, Retrieval) or one block of ``block`` consecutive examples (the
    image tasks shuffle whole batches). With ``permute_first`` the base order is a seeded permutation
    (the image tasks' fixed order).
    """

    def __init__(
        self, num_examples: int, buffer_size: int, seed: int, block: int = 1, permute_first: bool = False
    ) -> None:
        super().__init__(num_examples, seed)
        self.buffer_size = max(1, buffer_size)
        self.block = max(1, block)
        self.permute_first = permute_first

    def __iter__(self) -> Iterator[int]:
        base = np.arange(self.num_examples)
        if self.permute_first:
            base = np.random.default_rng(self.seed).permutation(self.num_examples)
        units = [base[i : i + self.block] for i in range(0, self.num_examples, self.block)]
        rng = np.random.default_rng((self.seed, self.epoch))
        buffer: list[np.ndarray] = []
        for unit in units:
            buffer.append(unit)
            if len(buffer) >= self.buffer_size:
                yield from buffer.pop(int(rng.integers(len(buffer)))).tolist()
        while buffer:
            yield from buffer.pop(int(rng.integers(len(buffer)))).tolist()


class FullShuffleSampler(SeededSampler):
    """A fresh seeded permutation every epoch."""

    def __iter__(self) -> Iterator[int]:
        yield from np.random.default_rng((self.seed, self.epoch)).permutation(self.num_examples).tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader that can resume in the middle of an epoch.

    Lightning stores ``state_dict()`` in its checkpoints (loaders with ``state_dict``/``load_state_dict`` are
    "stateful" to it) and calls ``load_state_dict`` on resume before the epoch's iterator is first advanced.
    The state is the sampler's epoch and the number of batches handed out in it; the samplers are
    deterministic given (seed, epoch), so skipping that many batches of the same epoch continues exactly
    where the killed run stopped. Batches are counted where they leave the loader (Lightning does not
    prefetch from sized loaders), so the count matches the optimiser steps taken on this epoch's data.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_served = 0
        self.pass_epoch: int | None = None
        self.resume_from: dict[str, Any] | None = None

    def _epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.pass_epoch, "batches_served": self.batches_served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_from = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        # The base iterator is made here, not lazily, because making it draws the workers' base seed from
        # torch's global generator: drawing it later would shift the restored random stream by one draw.
        batches = super().__iter__()
        return self._serve(batches)

    def _serve(self, batches: Iterator[Any]) -> Iterator[Any]:
        # Runs at the first next(), after Lightning has set this epoch on the sampler.
        self.pass_epoch, self.batches_served = self._epoch(), 0
        resume, self.resume_from = self.resume_from, None
        if resume and resume["epoch"] == self.pass_epoch and 0 < resume["batches_served"] < len(self):
            # Skipped batches are still loaded (cheap from memory-mapped arrays) so that this needs no
            # private DataLoader API and works the same with workers and with DDP's sampler wrapper.
            for _ in islice(batches, resume["batches_served"]):
                self.batches_served += 1
        for batch in batches:
            self.batches_served += 1
            yield batch


class LRADataModule(L.LightningDataModule):
    """Base for every LRA task.

    Args:
        seq_len: tokens per example after truncation/padding.
        batch_size: training batch size (evaluation uses ``eval_batch_size``, default the same).
        num_workers: DataLoader workers.
        seed: drives shuffling and any subsampling.
        shuffle: ``official`` (the task's shuffle buffer), ``full`` (a permutation per epoch) or ``none``.
        shuffle_buffer: buffer size in units for ``shuffle=official``.
        shuffle_unit: ``example`` or ``batch`` (the image tasks shuffle whole batches).
        drop_last_eval: drop the last partial batch of val/test (official for Retrieval, Image, Pathfinder).
        max_train_samples, max_eval_samples: seeded random subsets, for quick CPU profiles and tests.
        data_root: overrides ``$LRA_DATA_DIR`` (default ``~/.cache/lra``).
    """

    task_name: ClassVar[str] = "lra"
    vocab_size: ClassVar[int] = 256
    num_classes: ClassVar[int] = 2
    dual: ClassVar[bool] = False

    def __init__(
        self,
        seq_len: int,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: str = "official",
        shuffle_buffer: int = 1024,
        shuffle_unit: str = "example",
        drop_last_eval: bool = False,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        data_root: str | None = None,
    ) -> None:
        super().__init__()
        if shuffle not in SHUFFLE_MODES:
            raise ConfigError(f"data.shuffle={shuffle!r} is not one of {SHUFFLE_MODES}")
        if shuffle_unit not in ("example", "batch"):
            raise ConfigError(f"data.shuffle_unit={shuffle_unit!r} is not one of ('example', 'batch')")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_unit = shuffle_unit
        self.drop_last_eval = drop_last_eval
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.root = Path(data_root).expanduser() if data_root else default_data_root()
        self.datasets: dict[str, ArrayDataset] = {}

    # -- what a task provides -------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Where the data came from: ``release``, ``parquet``, ``hf`` or ``generated``."""
        raise NotImplementedError

    def cache_params(self) -> dict[str, Any]:
        """Everything that determines the cached arrays (source paths, lengths, generator settings)."""
        raise NotImplementedError

    def build_arrays(self) -> ArraySplits:
        """Read or generate the data and return ``{split: arrays}`` for train, val and test."""
        raise NotImplementedError

    # -- shared machinery -----------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        params = {"task": self.task_name, "seq_len": self.seq_len, **self.cache_params()}
        return self.root / "cache" / self.task_name / params_key(params)

    def load_arrays(self) -> ArraySplits:
        return cached_arrays(self.cache_dir, self._checked_build)

    def source_location(self) -> str:
        """Where the arrays are read from, for error messages: the task's data folder, else its source."""
        data_dir = getattr(self, "data_dir", None)
        if data_dir:
            return f"the data at {data_dir}"
        try:
            return f"the {self.source} data"
        except Exception:
            # Only a message is being built: a source that cannot even be located has its own error.
            return "the task's data"

    def _checked_build(self) -> ArraySplits:
        try:
            splits = self.build_arrays()
        except Exception as error:
            # Readers' own messages name the file when they can; the note (Python 3.11+) says what
            # happened around them.
            if hasattr(error, "add_note"):
                error.add_note(
                    f"{self.task_name}: reading {self.source_location()} failed, so nothing was cached; fix "
                    f"or re-download the input named above (task.data_dir) and rerun"
                )
            raise
        for split in SPLITS:
            if split not in splits or len(splits[split]["labels"]) == 0:
                raise DataError(
                    f"{self.task_name}: the {split} split is empty or missing (read from "
                    f"{self.source_location()}); check that its {split} file is complete (re-download or "
                    f"re-extract it), or point task.data_dir at a complete copy"
                )
            labels = np.asarray(splits[split]["labels"])
            bad = (labels < 0) | (labels >= self.num_classes)
            if bad.any():
                raise DataError(
                    f"{self.task_name}: the {split} split has label {int(labels[bad][0])} at example "
                    f"{int(np.flatnonzero(bad)[0])} (read from {self.source_location()}), outside "
                    f"0..{self.num_classes - 1}; check that task.data_dir holds this task's data"
                )
        return splits

    def prepare_data(self) -> None:
        self.load_arrays()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        arrays = self.load_arrays()
        for split in SPLITS:
            limit = self.max_train_samples if split == "train" else self.max_eval_samples
            size = len(arrays[split]["labels"])
            indices = None
            if limit is not None and limit < size:
                # The subsample does not follow the training seed: every run of a task, whatever its seed or
                # attention, is scored on the same examples, so their accuracies differ only by the model.
                indices = np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(size, limit, replace=False))
            self.datasets[split] = ArrayDataset(arrays[split], indices)

    def _sampler(self, size: int) -> Sampler[int] | None:
        if self.shuffle == "none":
            return None
        if self.shuffle == "full":
            return FullShuffleSampler(size, self.seed)
        by_batch = self.shuffle_unit == "batch"
        return BufferShuffleSampler(
            size,
            self.shuffle_buffer,
            self.seed,
            block=self.batch_size if by_batch else 1,
            permute_first=by_batch,
        )

    def _loader(self, split: str, batch_size: int, drop_last: bool, train: bool) -> DataLoader:
        dataset = self.datasets[split]
        loader_class = ResumableDataLoader if train else DataLoader
        return loader_class(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            sampler=self._sampler(len(dataset)) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, drop_last=True, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, self.drop_last_eval, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, self.drop_last_eval, train=False)

    def describe(self) -> dict[str, Any]:
        """What the run summary records about the data."""
        sizes = {split: len(ds) for split, ds in self.datasets.items()}
        # Per-class counts of the examples each split actually serves, so reports can print the
        # majority-class rate of the very examples that were scored.
        class_counts = {
            split: np.bincount(
                np.asarray(ds.arrays["labels"])[ds.indices], minlength=self.num_classes
            ).tolist()
            for split, ds in self.datasets.items()
        }
        return {
            "task": self.task_name,
            "source": self.source,
            "seq_len": self.seq_len,
            "sizes": sizes,
            "num_classes": self.num_classes,
            "class_counts": class_counts,
            "cache_dir": str(self.cache_dir),
        }


def missing_data_error(task: str, path: Path, expected: str, how_to_get: str) -> MissingDataError:
    """The error for absent data: where we looked, what we expected there, and how to get it."""
    return MissingDataError(f"{task}: no data at {path}\n  expected: {expected}\n  to fix: {how_to_get}")
