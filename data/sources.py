"""Finding and opening the tasks that live outside the LRA release: IMDb (Text) and CIFAR-10 (Image).

Both come from one of three places, chosen by ``data.source``:

- ``parquet``: a folder with ``train``/``test`` parquet files in the Hugging Face layout (the project copy
  ``../shared/data/<name>``, or a hub snapshot with ``plain_text/train-00000-of-00001.parquet``);
- ``hf``: the Hugging Face hub by name (needs the network or a populated HF cache);
- ``release``: the dataset's own distribution (aclImdb text files, the CIFAR-10 python/binary batches).

``auto`` takes an explicit ``data_dir`` as parquet or release by its contents; without one it uses the
project copy when present, else the hub.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path

from data.base import missing_data_error
from data.cache import ensure_writable
from lra.errors import ConfigError, DataError

SOURCES = ("auto", "parquet", "hf", "release")
REPO_ROOT = Path(__file__).resolve().parents[1]
# The project's parquet copies sit beside the repository (shared/data/<name>).
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

log = logging.getLogger(__name__)


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


def resolve_source(
    task: str,
    requested: str,
    data_dir: Path | None,
    default_dir: Path,
    is_release: Callable[[Path], bool],
    expected: str,
    how_to_get: str,
    splits: tuple[str, ...] = ("train", "test"),
) -> tuple[str, Path | None]:
    """Decide ``(source, folder)`` before anything is read, so the cache key can name it.

    Args:
        requested: ``auto``, ``parquet``, ``hf`` or ``release``.
        data_dir: the user's folder, or ``None`` for the project copy / the hub.
        default_dir: the project's parquet copy.
        is_release: recognises a folder in the dataset's own layout.
        expected, how_to_get: wording for the error when nothing usable is found.
    """
    if requested not in SOURCES:
        raise ConfigError(f"data.source={requested!r} is not one of {SOURCES}")
    if requested == "hf":
        return "hf", None
    folder = data_dir if data_dir is not None else default_dir
    if requested in ("auto", "parquet") and parquet_split_files(folder, splits):
        return "parquet", folder
    if requested in ("auto", "release") and data_dir is not None and is_release(data_dir):
        return "release", data_dir
    if requested == "auto" and data_dir is None:
        return "hf", None
    raise missing_data_error(task, folder, expected, how_to_get)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' per-split progress bars while a cache is built, then restore them."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


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
    splits: tuple[str, ...] = ("train", "test"),
):  # -> datasets.DatasetDict
    """Open ``splits`` with ``datasets``: local parquet files (offline) or the hub dataset ``hub_name``."""
    from datasets import load_dataset

    if source == "parquet":
        files = parquet_split_files(folder, splits)
        try:
            return load_dataset("parquet", data_files=files, cache_dir=str(scratch))
        except Exception as err:  # pyarrow's messages do not say which file is damaged
            raise unreadable_parquet_error(files, err) from err
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


def unreadable_parquet_error(files: Mapping[str, list[str]], err: Exception) -> DataError:
    """Find the file that does not read, so the error names it."""
    import pyarrow.parquet as pq

    for path in (path for paths in files.values() for path in paths):
        try:
            pq.read_table(path)
        except Exception as file_err:  # any reader failure identifies the file
            return DataError(
                f"{path}: not a readable parquet file ({type(file_err).__name__}: {file_err}); "
                f"replace it with an intact copy"
            )
    paths = ", ".join(path for paths in files.values() for path in paths)
    return DataError(f"reading the parquet files {paths} failed ({type(err).__name__}: {err})")


def check_sizes(task: str, source: str, sizes: Mapping[str, int], official: Mapping[str, int]) -> None:
    """Log a warning when split sizes differ from the official ones (results then are not comparable)."""
    for split, expected in official.items():
        if sizes.get(split) != expected:
            log.warning(
                "%s: the %s split has %s examples (source %s); the official one has %s, so results "
                "are not comparable with published numbers",
                task,
                split,
                sizes.get(split),
                source,
                f"{expected:,}",
            )


class LocatedSource:
    """Mixin for the tasks that live outside the LRA release (Text, Image): where their data comes from.

    A subclass names its project copy (``default_dir``), recognises the dataset's own layout
    (``is_release``) and words the missing-data error (``expected``, ``how_to_get``); its constructor calls
    ``set_source``. The mixin decides ``(source, folder)`` on first use, so that building the object never
    needs the data, and supplies the cache-key entries that identify where the data came from.
    """

    task_name: str
    default_dir: Path
    is_release: Callable[[Path], bool]  # subclasses wrap it in staticmethod, so it is not bound to self
    expected: str
    how_to_get: str

    def set_source(self, data_dir: str | None, source: str, hub_name: str) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else None
        self.requested_source = source
        self.hub_name = hub_name

    @cached_property
    def located(self) -> tuple[str, Path | None]:
        """``(source, folder)``: see ``resolve_source``."""
        return resolve_source(
            self.task_name,
            self.requested_source,
            self.data_dir,
            self.default_dir,
            self.is_release,
            self.expected,
            self.how_to_get,
        )

    @property
    def source(self) -> str:
        return self.located[0]

    def source_params(self) -> dict[str, str]:
        source, folder = self.located
        return {"source": source, "where": self.hub_name if folder is None else str(folder)}
