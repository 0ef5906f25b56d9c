"""The shared LightningDataModule: cached token arrays in, uniform batches out.

Every task turns its source into ``{split: {"input_ids": [N, L], "lengths": [N], "labels": [N]}}`` (plus
``input_ids_2``/``lengths_2`` for the two-document Retrieval task), built once, cached under
``$LRA_DATA_DIR/cache`` and memory-mapped afterwards. Batches are ``{"input_ids", "mask", "label"}`` (plus
``_2`` keys), where ``mask`` is True at real (non-padding) positions.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
# Seeds the evaluation and training subsamples (max_eval_samples, max_train_samples), not the run seed.
SUBSAMPLE_SEED = 0

log = logging.getLogger(__name__)


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"data.{key}={value!r} is not one of {tuple(allowed)}")


def missing_data_error(task: str, path: Path, expected: str, how_to_get: str) -> MissingDataError:
    """The error for absent data: where we looked, what we expected there, and how to get it."""
    return MissingDataError(f"{task}: no data at {path}\n  expected: {expected}\n  to fix: {how_to_get}")


def pad_ids(
    docs: Sequence[Any], seq_len: int, to_ids: Callable[[Any], Sequence[int]], dtype: type = np.uint16
) -> tuple[np.ndarray, np.ndarray]:
    """Each ``to_ids(doc)`` truncated to ``seq_len`` and right-padded with 0; also the lengths ``[N]``."""
    ids = np.zeros((len(docs), seq_len), dtype=dtype)
    lengths = np.zeros(len(docs), dtype=np.int32)
    for row, doc in enumerate(docs):
        tokens = to_ids(doc)[:seq_len]
        ids[row, : len(tokens)] = tokens
        lengths[row] = len(tokens)
    return ids, lengths


def take(arrays: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[rows] for name, array in arrays.items()}


def map_in_processes(
    function: Callable[[Any], Any], jobs: Sequence[Any], workers: int | None, chunksize: int = 1
) -> Iterator[Any]:
    """``function`` over ``jobs``, results in job order, in ``workers`` forked processes (None or 0: every
    core; never more than there are chunks of ``chunksize`` jobs); with one process the jobs run here."""
    processes = max(1, min(workers or os.cpu_count() or 1, -(-len(jobs) // chunksize)))
    if processes == 1:
        yield from map(function, jobs)
        return
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        yield from pool.imap(function, jobs, chunksize)


class ArrayDataset(Dataset):
    """Examples from memory-mapped arrays; the mask is derived from the stored lengths."""

    def __init__(self, arrays: dict[str, np.ndarray], indices: np.ndarray | None = None) -> None:
        self.arrays = arrays
        self.indices = np.arange(len(arrays["labels"])) if indices is None else indices
        self.suffixes = ("", "_2") if "input_ids_2" in arrays else ("",)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        row = int(self.indices[item])
        example = {"label": torch.tensor(int(self.arrays["labels"][row]), dtype=torch.long)}
        for suffix in self.suffixes:
            ids = torch.from_numpy(np.asarray(self.arrays["input_ids" + suffix][row], dtype=np.int64))
            example["input_ids" + suffix] = ids
            example["mask" + suffix] = torch.arange(ids.shape[0]) < int(self.arrays["lengths" + suffix][row])
        return example


class ShuffleSampler(Sampler[int]):
    """A seeded order of ``num_examples`` indices for the epoch Lightning sets.

    Without ``buffer_size``, a fresh permutation each epoch. With it, the official input order: a fixed base
    order read through a shuffle buffer of ``buffer_size`` units, a unit being one example or one block of
    ``block`` consecutive examples; ``permute_first`` makes the base order a seeded permutation (the image
    tasks shuffle whole batches of a fixed order).
    """

    def __init__(
        self,
        num_examples: int,
        seed: int,
        buffer_size: int | None = None,
        block: int = 1,
        permute_first: bool = False,
    ) -> None:
        self.num_examples, self.seed, self.epoch = num_examples, seed, 0
        self.buffer_size = None if buffer_size is None else max(1, buffer_size)
        self.block, self.permute_first = max(1, block), permute_first

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[int]:
        count = self.num_examples
        if self.buffer_size is None:
            yield from np.random.default_rng((self.seed, self.epoch)).permutation(count).tolist()
            return
        base = np.random.default_rng(self.seed).permutation(count) if self.permute_first else np.arange(count)
        rng = np.random.default_rng((self.seed, self.epoch))
        buffer: list[np.ndarray] = []
        for start in range(0, count, self.block):
            buffer.append(base[start : start + self.block])
            if len(buffer) >= self.buffer_size:
                yield from buffer.pop(int(rng.integers(len(buffer)))).tolist()
        while buffer:
            yield from buffer.pop(int(rng.integers(len(buffer)))).tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader that resumes in the middle of an epoch.

    Lightning checkpoints ``state_dict()`` (the sampler's epoch and the batches handed out in it) and calls
    ``load_state_dict`` on resume before the epoch's iterator is first advanced. The samplers are
    deterministic given (seed, epoch), so skipping that many batches of the same epoch continues exactly where
    the killed run stopped. Lightning does not prefetch from sized loaders, so the count matches the steps.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_served = 0
        self.pass_epoch: int | None = None
        self.resume_from: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.pass_epoch, "batches_served": self.batches_served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resume_from = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        # Made here, not lazily: making it draws the workers' base seed from torch's global generator, and
        # drawing it later would shift the restored random stream by one draw.
        return self._serve(super().__iter__())

    def _serve(self, batches: Iterator[Any]) -> Iterator[Any]:
        # Runs at the first next(), after Lightning has set this epoch on the sampler.
        self.pass_epoch, self.batches_served = getattr(self.sampler, "epoch", None), 0
        resume, self.resume_from = self.resume_from, None
        if resume and resume["epoch"] == self.pass_epoch and 0 < resume["batches_served"] < len(self):
            # Skipped batches are still loaded (cheap from memory-mapped arrays): no private DataLoader API,
            # and the same with workers and with DDP's sampler wrapper.
            self.batches_served = sum(1 for _ in islice(batches, resume["batches_served"]))
        for batch in batches:
            self.batches_served += 1
            yield batch


class LRADataModule(L.LightningDataModule):
    """Base for every LRA task.

    Args:
        seq_len: tokens per example after truncation/padding.
        batch_size: training batch size (evaluation uses ``eval_batch_size``, default the same).
        seed: drives shuffling.
        shuffle: ``official`` (the task's shuffle buffer), ``full`` (a permutation per epoch) or ``none``.
        shuffle_buffer: buffer size in units for ``shuffle=official``.
        shuffle_unit: ``example`` or ``batch`` (the image tasks shuffle whole batches).
        drop_last_eval: drop the last partial batch of val/test (official for Retrieval, Image, Pathfinder).
        max_train_samples, max_eval_samples: fixed random subsets, for quick CPU profiles and tests.
        data_root: overrides ``$LRA_DATA_DIR`` (default ``~/.cache/lra``).
    """

    task_name: ClassVar[str] = "lra"
    vocab_size: ClassVar[int] = 256
    num_classes: ClassVar[int] = 2
    dual: ClassVar[bool] = False
    official_sizes: ClassVar[dict[str, int]] = {}

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
        check_choice("shuffle", shuffle, ("official", "full", "none"))
        check_choice("shuffle_unit", shuffle_unit, ("example", "batch"))
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

    # What a task provides.
    @property
    def source(self) -> str:
        """``release``, ``parquet``, ``hf`` or ``generated``."""
        raise NotImplementedError

    def cache_params(self) -> dict[str, Any]:
        """Everything that determines the cached arrays (source paths, lengths, generator settings)."""
        raise NotImplementedError

    def build_arrays(self) -> ArraySplits:
        """``{split: arrays}`` for train, val and test, read or generated."""
        raise NotImplementedError

    # Shared machinery.
    @property
    def cache_dir(self) -> Path:
        params = {"task": self.task_name, "seq_len": self.seq_len, **self.cache_params()}
        return self.root / "cache" / self.task_name / params_key(params)

    def load_arrays(self) -> ArraySplits:
        return cached_arrays(self.cache_dir, self._checked_build)

    def check_sizes(self, sizes: Mapping[str, int]) -> None:
        """Warn when split sizes differ from the official ones (results then are not comparable)."""
        for split, expected in self.official_sizes.items():
            if sizes.get(split) != expected:
                log.warning(
                    "%s: the %s split has %s examples (source %s); the official one has %s, so results "
                    "are not comparable with published numbers",
                    *(self.task_name, split, sizes.get(split), self.source, f"{expected:,}"),
                )

    def _checked_build(self) -> ArraySplits:
        # For error messages; the source is known by now, since the cache key names it.
        data_dir = getattr(self, "data_dir", None)
        where = f"the data at {data_dir}" if data_dir else f"the {self.source} data"
        try:
            splits = self.build_arrays()
        except Exception as error:
            # Readers' own messages name the file; the note (Python 3.11+) says what happened around them.
            if hasattr(error, "add_note"):
                error.add_note(
                    f"{self.task_name}: reading {where} failed, so nothing was cached; fix "
                    f"or re-download the input named above (task.data_dir) and rerun"
                )
            raise
        for split in SPLITS:
            if split not in splits or len(splits[split]["labels"]) == 0:
                raise DataError(
                    f"{self.task_name}: the {split} split is empty or missing (read from "
                    f"{where}); check that its {split} file is complete (re-download or "
                    f"re-extract it), or point task.data_dir at a complete copy"
                )
            labels = np.asarray(splits[split]["labels"])
            bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
            if len(bad):
                raise DataError(
                    f"{self.task_name}: the {split} split has label {int(labels[bad[0]])} at example "
                    f"{int(bad[0])} (read from {where}), outside "
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
                # Not the run seed: every run of a task is scored on the same examples, whatever its seed.
                indices = np.sort(np.random.default_rng(SUBSAMPLE_SEED).choice(size, limit, replace=False))
            self.datasets[split] = ArrayDataset(arrays[split], indices)

    def _loader(self, split: str) -> DataLoader:
        dataset, train = self.datasets[split], split == "train"
        sampler = None
        if train and self.shuffle != "none":
            by_batch = self.shuffle == "official" and self.shuffle_unit == "batch"
            sampler = ShuffleSampler(
                len(dataset),
                self.seed,
                self.shuffle_buffer if self.shuffle == "official" else None,
                block=self.batch_size if by_batch else 1,
                permute_first=by_batch,
            )
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            drop_last=train or self.drop_last_eval,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def describe(self) -> dict[str, Any]:
        """What the run summary records about the data; class counts are of the examples each split serves,
        so reports can print the majority-class rate of the very examples that were scored."""
        return {
            "task": self.task_name,
            "source": self.source,
            "seq_len": self.seq_len,
            "sizes": {split: len(ds) for split, ds in self.datasets.items()},
            "num_classes": self.num_classes,
            "class_counts": {
                split: np.bincount(
                    np.asarray(ds.arrays["labels"])[ds.indices], minlength=self.num_classes
                ).tolist()
                for split, ds in self.datasets.items()
            },
            "cache_dir": str(self.cache_dir),
        }
