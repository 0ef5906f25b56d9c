"""Pathfinder and Path-X (Linsley et al. 2018, NeurIPS, arXiv 1805.08315, as used by LRA, Tay et al. 2021,
arXiv 2011.04006): the release's on-disk layout, its reader, and the DataModules.

Layout of one difficulty folder (e.g. ``lra_release/pathfinder32/curv_contour_length_14``):
``imgs/<batch>/sample_<i>.png`` (8-bit grayscale, ``i`` restarts at 0 in each batch) and
``metadata/<batch>.npy``, which is **plain text** despite the suffix: one line per image with 11
space-separated fields (``METADATA_FIELDS``). The upstream generator saves the same rows as a binary ``.npy``
array; the reader accepts both. Pixel value = token id (0-255), row-major.

Without a release folder the DataModule generates one in this layout (``data/pathfinder_generator.py``); the
drawing code is loaded only then.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from data.base import SPLITS, LRADataModule, check_choice, map_in_processes, missing_data_error
from data.cache import ArraySplits
from lra.errors import ConfigError, DataError, MissingDataError

log = logging.getLogger(__name__)

# Contour length of each difficulty, and its folder in the release.
DIFFICULTIES = {"easy": 6, "intermediate": 9, "hard": 14}
DIFFICULTY_DIRS = {
    "easy": "curv_baseline",
    "intermediate": "curv_contour_length_9",
    "hard": "curv_contour_length_14",
}
SPLIT_MODES = ("seeded", "contiguous")
# The space-separated fields of one metadata line.
METADATA_FIELDS = (
    "subdir filename index label continuity contour_length distractor_length paddle_length paddle_thickness "
    "paddle_margin n_paddle_contrasts"
)
NPY_MAGIC = b"\x93NUMPY"
RELEASE_LAYOUT = (
    "a Pathfinder difficulty folder with metadata/<batch>.npy and imgs/<batch>/sample_<i>.png "
    "(the LRA release layout)"
)
HOW_TO_GET_RELEASE = (
    "point task.data_dir at a difficulty folder such as lra_release/pathfinder32/curv_contour_length_14 "
    "(Path-X: lra_release/pathfinder128/curv_contour_length_14) from lra_release.gz "
    "(google-research/long-range-arena), or at lra_release/pathfinder32 with data.difficulty=all; "
    "or leave task.data_dir=null to generate the data with the official distribution"
)


def write_metadata(path: Path, rows: Iterable[Sequence[str]]) -> None:
    """The release's text format: one space-separated line per image, newline-terminated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(row) + "\n" for row in rows), encoding="utf-8")


def read_metadata(path: Path) -> list[list[str]]:
    """Rows of one metadata file, in the release's text format or a binary ``.npy`` array; a malformed line
    raises naming the file and the line."""
    raw = path.read_bytes()
    if raw.startswith(NPY_MAGIC):
        try:
            array = np.atleast_2d(np.load(path, allow_pickle=False))
        except ValueError as err:
            raise DataError(f"{path}: unreadable binary metadata ({err})") from err
        lines = [(row + 1, [str(value) for value in entry]) for row, entry in enumerate(array)]
    else:
        lines = [
            (number, line.split())
            for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1)
            if line.strip()
        ]
    rows = []
    for number, fields in lines:
        if len(fields) != len(METADATA_FIELDS.split()):
            raise DataError(
                f"{path}:{number}: expected {len(METADATA_FIELDS.split())} space-separated fields "
                f"({METADATA_FIELDS}), got {len(fields)}: {' '.join(fields)!r}"
            )
        if fields[3] not in ("0", "1"):
            raise DataError(f"{path}:{number}: label (field 4) must be 0 or 1, got {fields[3]!r}")
        rows.append(fields)
    return rows


def list_examples(folder: Path, task: str = "pathfinder") -> tuple[list[Path], list[int]]:
    """Image paths and labels of one difficulty folder, in batch and line order; empty images are skipped."""
    metadata_dir = folder / "metadata"
    files = metadata_dir.glob("*.npy") if metadata_dir.is_dir() else []
    # Batches in numeric order (0, 2, 10), then any other names.
    files = sorted(files, key=lambda path: (0, int(path.stem)) if path.stem.isdigit() else (1, path.stem))
    if not files:
        raise missing_data_error(task, folder, RELEASE_LAYOUT, HOW_TO_GET_RELEASE)
    paths, labels, empty = [], [], []
    for file in files:
        for fields in read_metadata(file):
            image = folder / fields[0] / fields[1]
            try:
                size = image.stat().st_size
            except FileNotFoundError:
                raise MissingDataError(
                    f"{file}: lists {fields[0]}/{fields[1]}, but {image} does not exist"
                ) from None
            if size == 0:
                empty.append(image)
                continue
            paths.append(image)
            labels.append(int(fields[3]))
    if empty:
        log.warning("pathfinder: skipped %d empty image file(s), e.g. %s", len(empty), empty[0])
    return paths, labels


def decode_png(path: Path, resolution: int) -> np.ndarray:
    """Pixel values of one 8-bit grayscale PNG, row-major ``[resolution**2]`` uint8 (= token ids)."""
    try:
        with Image.open(path) as image:
            if image.mode != "L":
                raise DataError(f"{path}: expected an 8-bit grayscale PNG (mode L), got mode {image.mode}")
            if image.size != (resolution, resolution):
                raise DataError(
                    f"{path}: expected {resolution}x{resolution} pixels, got "
                    f"{image.size[0]}x{image.size[1]}; check data.resolution"
                )
            return np.asarray(image, dtype=np.uint8).reshape(-1)
    except (OSError, SyntaxError) as err:
        # PIL reports truncation and garbage without the file name (UnidentifiedImageError is an OSError).
        raise DataError(
            f"{path}: unreadable or truncated PNG ({err}); re-extract the release, or delete "
            f"the generated folder to regenerate it"
        ) from err


def decode_pngs(
    paths: Sequence[Path], resolution: int, workers: int | None = None, chunk: int = 1000
) -> np.ndarray:
    """Decode many PNGs in parallel; ``[len(paths), resolution**2]`` uint8."""
    out = np.zeros((len(paths), resolution * resolution), dtype=np.uint8)
    decode = partial(decode_png, resolution=resolution)
    for row, pixels in enumerate(map_in_processes(decode, paths, workers, chunk)):
        out[row] = pixels
    return out


class PathfinderDataModule(LRADataModule):
    """Pathfinder from the LRA release (``data_dir``) or from our generator (cached, seeded).

    Args:
        data_dir: a release difficulty folder, e.g. ``lra_release/pathfinder32/curv_contour_length_14``
            (with ``difficulty=all``: the ``pathfinder32`` folder holding the three); ``None`` generates.
        resolution: image side (32 for Pathfinder, 128 for Path-X); ``seq_len`` must be its square.
        difficulty: ``easy`` | ``intermediate`` | ``hard`` (LRA) | ``all`` (the three together).
        num_images: images per difficulty when generating (official 200,000).
        images_per_batch: images per ``imgs/<batch>`` folder when generating.
        generator_seed: seed of the generator (independent of the training seed).
        workers: processes for generating and decoding (default: every core).
        split: ``seeded`` (a permutation by ``split_seed``, then 80/10/10) or ``contiguous`` (file order).
        **kwargs: ``LRADataModule`` arguments (seq_len, batch_size, shuffle, ...).
    """

    task_name: ClassVar[str] = "pathfinder"
    vocab_size: ClassVar[int] = 256
    num_classes: ClassVar[int] = 2
    default_resolution: ClassVar[int] = 32

    def __init__(
        self,
        data_dir: str | None = None,
        resolution: int | None = None,
        difficulty: str = "hard",
        num_images: int = 200_000,
        images_per_batch: int = 1000,
        generator_seed: int = 0,
        workers: int | None = None,
        split: str = "seeded",
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        resolution = resolution or self.default_resolution
        kwargs.setdefault("seq_len", resolution * resolution)
        super().__init__(**kwargs)
        if self.seq_len != resolution * resolution:
            raise ConfigError(
                f"data.seq_len={self.seq_len} does not match data.resolution={resolution} "
                f"({resolution}x{resolution} = {resolution * resolution} pixels)"
            )
        check_choice("difficulty", difficulty, (*DIFFICULTIES, "all"))
        check_choice("split", split, SPLIT_MODES)
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.resolution = resolution
        self.difficulty = difficulty
        self.generator = dict(num_images=num_images, images_per_batch=images_per_batch, seed=generator_seed)
        self.workers = workers
        self.split = split
        self.split_seed = split_seed

    @property
    def source(self) -> str:
        return "release" if self.data_dir else "generated"

    def cache_params(self) -> dict[str, Any]:
        common = {key: getattr(self, key) for key in ("resolution", "difficulty", "split", "split_seed")}
        if self.data_dir:
            return {"data_dir": str(self.data_dir.resolve()), **common}
        from data.pathfinder_generator import GENERATOR_VERSION

        return {"generator": self.generator, "version": GENERATOR_VERSION, **common}

    def difficulty_dirs(self) -> list[Path]:
        """The difficulty folders to read, generating them first when ``data_dir`` is None."""
        names = list(DIFFICULTIES) if self.difficulty == "all" else [self.difficulty]
        if self.data_dir is None:
            from data.pathfinder_generator import generated_pathfinder_dir

            return [
                generated_pathfinder_dir(self.root, self.resolution, name, self.workers, **self.generator)
                for name in names
            ]
        if not self.data_dir.is_dir():
            raise missing_data_error(self.task_name, self.data_dir, RELEASE_LAYOUT, HOW_TO_GET_RELEASE)
        if self.difficulty == "all":
            return [self.data_dir / DIFFICULTY_DIRS[name] for name in names]
        return [self.data_dir]

    def build_arrays(self) -> ArraySplits:
        paths, labels = [], []
        for folder in self.difficulty_dirs():
            folder_paths, folder_labels = list_examples(folder, self.task_name)
            paths += folder_paths
            labels += folder_labels
        # 80/10/10, after a seeded permutation or in file order.
        count = len(paths)
        seeded = self.split == "seeded"
        order = np.random.default_rng(self.split_seed).permutation(count) if seeded else np.arange(count)
        num_train, num_val = int(0.8 * count), int(0.1 * count)
        splits: ArraySplits = {}
        for split, rows in zip(SPLITS, np.split(order, [num_train, num_train + num_val]), strict=True):
            splits[split] = {
                "input_ids": decode_pngs([paths[i] for i in rows], self.resolution, self.workers),
                "lengths": np.full(len(rows), self.seq_len, dtype=np.int32),
                "labels": np.asarray(labels, dtype=np.int64)[rows],
            }
        return splits

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            **{key: getattr(self, key) for key in ("resolution", "difficulty", "split")},
        }


class PathXDataModule(PathfinderDataModule):
    """Path-X: Pathfinder at 128x128 (16,384 tokens); same layout, ``lra_release/pathfinder128/...``."""

    task_name: ClassVar[str] = "pathx"
    default_resolution: ClassVar[int] = 128
