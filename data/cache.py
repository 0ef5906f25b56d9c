"""Where data lives, and a build-once cache of tokenised arrays that is never left half-written."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from filelock import FileLock, Timeout

from lra.errors import CacheError, DataDirError

DATA_DIR_ENV = "LRA_DATA_DIR"
ArraySplits = dict[str, dict[str, np.ndarray]]


def data_root() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "lra").expanduser()


def params_key(params: Mapping[str, Any]) -> str:
    """A short stable hash of the parameters that determine a cached artefact."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_writable(directory: Path) -> None:
    """Create ``directory`` or fail with a message that says how to choose another place."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as err:
        raise DataDirError(
            f"cannot write to the data directory {directory} ({err.strerror}); set ${DATA_DIR_ENV} to a "
            f"writable folder, e.g. `export {DATA_DIR_ENV}=$HOME/lra-data`"
        ) from err


def temporary_sibling(path: Path, prefix: str | None = None) -> Path:
    """A fresh hidden name beside ``path`` to build it in before an atomic rename. Unlike ``tempfile`` it
    creates nothing, so what is made there gets the usual umask permissions."""
    stem = prefix if prefix is not None else f".{path.name}.tmp-"
    return path.parent / f"{stem}{os.getpid()}-{secrets.token_hex(4)}"


def atomic_directory(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory in a temporary sibling and rename it into place when complete.

    A lock beside ``final`` makes a second process wait and reuse the first one's result. A killed build
    leaves a ``.tmp-*`` folder that the next build removes (the OS lock dies with its holder).
    """
    if final.is_dir():
        return final
    ensure_writable(final.parent)
    lock = FileLock(str(final) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process that is building {final} (lock {lock.lock_file})", flush=True)
        lock.acquire()
    try:
        if final.is_dir():
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = temporary_sibling(final, prefix=f".tmp-{final.name}-")
        try:
            tmp.mkdir()
            build(tmp)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    return final


def atomic_write(path: Path, write: Callable[[IO[Any]], Any], binary: bool = False) -> None:
    """``write(handle)`` into a temporary sibling of ``path``, then a rename: readers never see half a file,
    and a failed write leaves the previous one in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "xb" if binary else "x", encoding=None if binary else "utf-8") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text))


def cached_arrays(directory: Path, build: Callable[[], ArraySplits]) -> ArraySplits:
    """Load ``{split: {name: array}}`` from ``directory``, building and saving it first if absent.

    Arrays are stored as ``<split>.<name>.npy`` and memory-mapped. The ``COMPLETE`` marker lists them all; a
    missing or damaged one raises naming the file and saying to delete the cache.
    """

    def write(tmp: Path) -> None:
        splits = build()
        for split, arrays in splits.items():
            for name, array in arrays.items():
                np.save(tmp / f"{split}.{name}.npy", np.ascontiguousarray(array))
        (tmp / "COMPLETE").write_text(json.dumps({split: sorted(arrays) for split, arrays in splits.items()}))

    atomic_directory(directory, write)
    remedy = f"delete {directory} and rerun to rebuild it"
    marker = directory / "COMPLETE"
    try:
        contents = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(
            f"the cache {directory} is incomplete (unreadable {marker.name}: {err}); {remedy}"
        ) from err
    if isinstance(contents, list):
        # Caches written before the marker listed the files: every array found on disk.
        contents = {
            s: [f.name[len(s) + 1 : -4] for f in sorted(directory.glob(f"{s}.*.npy"))] for s in contents
        }
    loaded: ArraySplits = {split: {} for split in contents}
    for split, names in contents.items():
        for name in names:
            file = directory / f"{split}.{name}.npy"
            try:
                loaded[split][name] = np.load(file, mmap_mode="r")
            except (ValueError, OSError, EOFError) as err:
                raise CacheError(f"corrupt or missing cache file {file} ({err}); {remedy}") from err
        rows = {name: len(array) for name, array in loaded[split].items()}
        if len(set(rows.values())) > 1:
            raise CacheError(f"corrupt cache {directory}: {split} arrays differ in length {rows}; {remedy}")
    return loaded
