"""Finding and opening the tasks that live outside the LRA release: IMDb (Text) and CIFAR-10 (Image).

``data.source`` picks one of three places:

- ``parquet``: a folder with ``train``/``test`` parquet files in the Hugging Face layout (the project copy
  ``../shared/data/<name>``, or a hub snapshot with ``plain_text/train-00000-of-00001.parquet``);
- ``hf``: the Hugging Face hub by name (needs the network or a populated HF cache);
- ``release``: the dataset's own distribution (aclImdb text files, the CIFAR-10 python/binary batches).

``auto`` takes an explicit ``data_dir`` as parquet or release by its contents; without one it uses the
project copy when present, else the hub.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from data.base import LRADataModule, check_choice, missing_data_error
from data.cache import ensure_writable
from lra.errors import DataError

SOURCES = ("auto", "parquet", "hf", "release")
# The project's parquet copies sit beside the repository (shared/data/<name>).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLITS = ("train", "test")
Examples = tuple[Any, np.ndarray]  # (documents or pixel tokens, labels)


def parquet_split_files(folder: Path, splits: tuple[str, ...]) -> dict[str, list[str]] | None:
    """``{split: [files]}`` for ``<split>.parquet`` or ``<split>-NNNNN-of-NNNNN.parquet`` anywhere under
    ``folder``; ``None`` unless every split has at least one file."""
    if not folder.is_dir():
        return None
    found = {}
    for split in splits:
        files = sorted({*folder.rglob(f"{split}.parquet"), *folder.rglob(f"{split}-*.parquet")})
        if not files:
            return None
        found[split] = [str(file) for file in files]
    return found


@contextlib.contextmanager
def scratch_dir(root: Path) -> Iterator[Path]:
    """A temporary folder under the data root for ``datasets``' Arrow copy of local parquet files; it is
    only needed until the token arrays exist."""
    ensure_writable(root)
    with tempfile.TemporaryDirectory(prefix=".scratch-", dir=root) as folder:
        yield Path(folder)


def load_parquet_or_hub(
    task: str,
    source: str,
    folder: Path | None,
    hub_name: str,
    scratch: Path,
    splits: tuple[str, ...] = SPLITS,
):  # -> datasets.DatasetDict
    """Open ``splits`` with ``datasets``: local parquet files (offline) or the hub dataset ``hub_name``."""
    from datasets import load_dataset

    if source == "parquet":
        files = parquet_split_files(folder, splits)
        try:
            return load_dataset("parquet", data_files=files, cache_dir=str(scratch))
        except Exception as err:  # pyarrow's messages do not say which file is damaged
            raise unreadable_parquet_error([path for paths in files.values() for path in paths], err) from err
    try:
        return load_dataset(hub_name)
    except Exception as err:  # offline, unknown name, no credentials: one message that says what to do
        raise missing_data_error(
            task,
            Path(hub_name),
            f"the Hugging Face dataset {hub_name} (loading it failed: {type(err).__name__}: {err})",
            "go online (or populate the HF cache), or pass task.data_dir=<folder with train/test parquet "
            "files> with data.source=parquet",
        ) from err


def unreadable_parquet_error(paths: list[str], err: Exception) -> DataError:
    """Find the file that does not read, so the error names it."""
    import pyarrow.parquet as pq

    for path in paths:
        try:
            pq.read_table(path)
        except Exception as file_err:  # any reader failure identifies the file
            return DataError(
                f"{path}: not a readable parquet file ({type(file_err).__name__}: {file_err}); "
                f"replace it with an intact copy"
            )
    return DataError(f"reading the parquet files {', '.join(paths)} failed ({type(err).__name__}: {err})")


class LocatedSource(LRADataModule):
    """Base of Text and Image: where their data comes from, decided on first use so that building the
    module never needs the data.

    A subclass names its project copy (``default_dir``), recognises the dataset's own layout
    (``is_release``) and words the missing-data error (``expected``, ``how_to_get``).
    """

    default_dir: Path
    expected: str
    how_to_get: str

    def __init__(self, data_dir: str | None, source: str, hub_name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else None
        self.requested_source = source
        self.hub_name = hub_name

    @staticmethod
    def is_release(folder: Path) -> bool:
        raise NotImplementedError

    @cached_property
    def located(self) -> tuple[str, Path | None]:
        """``(source, folder)``, the folder being ``None`` for the hub."""
        requested, data_dir = self.requested_source, self.data_dir
        check_choice("source", requested, SOURCES)
        if requested == "hf":
            return "hf", None
        folder = data_dir if data_dir is not None else self.default_dir
        if requested in ("auto", "parquet") and parquet_split_files(folder, SPLITS):
            return "parquet", folder
        if requested in ("auto", "release") and data_dir is not None and self.is_release(data_dir):
            return "release", data_dir
        if requested == "auto" and data_dir is None:
            return "hf", None
        raise missing_data_error(self.task_name, folder, self.expected, self.how_to_get)

    @property
    def source(self) -> str:
        return self.located[0]

    def source_params(self) -> dict[str, str]:
        source, folder = self.located
        return {"source": source, "where": self.hub_name if folder is None else str(folder)}

    def read_splits(
        self, from_release: Callable[[Path, str], Examples], from_dataset: Callable[[Any, str], Examples]
    ) -> dict[str, Examples]:
        """``{split: (examples, labels)}`` for train and test, read by ``from_release(folder, split)`` or
        ``from_dataset(dataset[split], split)``; the ``datasets`` progress bars stay off meanwhile."""
        source, folder = self.located
        if source == "release":
            splits = {split: from_release(folder, split) for split in SPLITS}
        else:
            import datasets

            was_enabled = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
            try:
                with scratch_dir(self.root) as scratch:
                    dataset = load_parquet_or_hub(self.task_name, source, folder, self.hub_name, scratch)
                    splits = {split: from_dataset(dataset[split], split) for split in SPLITS}
            finally:
                if was_enabled:
                    datasets.enable_progress_bars()
        self.check_sizes({split: len(labels) for split, (_, labels) in splits.items()})
        return splits
