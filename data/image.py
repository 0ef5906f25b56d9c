"""Image (LRA, Tay et al. 2021, arXiv 2011.04006): grayscale CIFAR-10 (Krizhevsky 2009) as a sequence of 1024
pixel tokens, 10 classes.

Grayscale by TensorFlow's ``rgb_to_grayscale`` (the official pipeline): pixels to float32 in [0, 1]
(``x * (1/255)``), weighted sum 0.2989 R + 0.5870 G + 0.1140 B, then back to 8 bits by
``convert_image_dtype``: multiply by 255.5 (``uint8.max + 0.5``) and cast, which truncates toward zero.
The 0-255 value is the token id (vocab 256, no shift; 0 doubles as the pad id, as officially); the 32x32
image is flattened row-major.
Splits: a seeded random 45k/5k cut of the 50k train set, and the 10k test set.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.base import check_choice, map_in_processes, take
from data.cache import ArraySplits
from data.sources import SHARED_DATA, LocatedSource
from lra.errors import ConfigError, DataError

CIFAR_HUB = "uoft-cs/cifar10"
DEFAULT_PARQUET_DIR = SHARED_DATA / "cifar10"
SIDE = 32
SEQ_LEN = SIDE * SIDE
NUM_VAL = 5_000
VAL_SPLITS = ("seeded", "contiguous")
GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)
# The CIFAR-10 python release: pickled dicts with b"data" [10000, 3072] (R, G, B planes) and b"labels".
PY_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
# The binary release: records of 1 label byte followed by the same 3072 plane-ordered bytes.
BIN_BATCHES = {split: [f"{name}.bin" for name in names] for split, names in PY_BATCHES.items()}


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """TensorFlow's ``rgb_to_grayscale`` on uint8 pixels ``[..., 3]``, computed in float32 as TF does."""
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 pixels [..., 3], got {rgb.dtype} {list(rgb.shape)}")
    unit = rgb.astype(np.float32) * np.float32(1 / 255)
    gray = unit[..., 0] * GRAY_WEIGHTS[0] + unit[..., 1] * GRAY_WEIGHTS[1] + unit[..., 2] * GRAY_WEIGHTS[2]
    # The weights sum to 0.9999, so gray * 255.5 < 256 and the cast cannot overflow.
    return (gray * np.float32(255.5)).astype(np.uint8)


def _decode_image(job: tuple[bytes, str]) -> np.ndarray:
    """One image file (JPEG/PNG bytes) to ``[32, 32, 3]`` uint8 RGB; the name labels errors."""
    from PIL import Image

    data, name = job
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            if size == (SIDE, SIDE):
                return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (OSError, ValueError) as err:  # PIL reports damage as OSError/UnidentifiedImageError
        raise DataError(f"{name}: cannot decode the image ({err})") from err
    raise DataError(f"{name}: the image is {size[0]}x{size[1]}, expected {SIDE}x{SIDE}")


def decode_to_tokens(
    encoded: Sequence[bytes], names: Sequence[str] | None = None, num_proc: int = 1, chunk: int = 2_000
) -> np.ndarray:
    """Image files to flattened grayscale tokens ``[N, 1024]`` uint8, decoded in ``num_proc`` processes;
    ``names`` (default ``row <i>``) say which image failed in an error."""
    names = [f"row {row}" for row in range(len(encoded))] if names is None else names
    rgb = np.empty((len(encoded), SIDE, SIDE, 3), dtype=np.uint8)
    jobs = list(zip(encoded, names, strict=True))
    for row, pixels in enumerate(map_in_processes(_decode_image, jobs, num_proc, chunk)):
        rgb[row] = pixels
    return rgb_to_gray(rgb).reshape(len(rgb), SEQ_LEN)


def read_cifar_release(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The official CIFAR-10 python or binary batches: tokens ``[N, 1024]`` uint8 and labels ``[N]``."""
    planes, labels = [], []
    if all((folder / name).is_file() for name in PY_BATCHES[split]):
        for name in PY_BATCHES[split]:
            with open(folder / name, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            planes.append(np.asarray(batch[b"data"], dtype=np.uint8))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    else:
        for name in BIN_BATCHES[split]:
            records = np.fromfile(folder / name, dtype=np.uint8).reshape(-1, 1 + 3 * SEQ_LEN)
            labels.append(records[:, 0].astype(np.int64))
            planes.append(records[:, 1:])
    rgb = np.concatenate(planes).reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return rgb_to_gray(np.ascontiguousarray(rgb)).reshape(-1, SEQ_LEN), np.concatenate(labels)


class ImageDataModule(LocatedSource):
    """Grayscale CIFAR-10 from local parquet files, the Hugging Face hub, or the official CIFAR-10 batches.

    Args:
        data_dir: a folder with ``train``/``test`` parquet files (columns ``img`` as an Image feature,
            ``label``), or ``cifar-10-batches-py`` / ``cifar-10-batches-bin``; ``None`` uses the project copy
            ``../shared/data/cifar10`` (JPEG re-encodings, see its README), else the hub.
        source: ``auto``, ``parquet``, ``hf`` or ``release`` (see data/sources.py).
        hub_name: the hub dataset for ``source=hf``.
        val_split: ``seeded`` (a random 5k of train, fixed by ``split_seed``) or ``contiguous`` (the last 5k
            as stored; only meaningful for a copy in TFDS order, since class-sorted copies put whole classes
            in val).
        split_seed: seeds the train/val cut (independent of the training seed, so every run sees one val set).
        num_proc: processes that decode the image files.
    """

    task_name = "image"
    vocab_size = 256
    num_classes = 10
    default_dir = DEFAULT_PARQUET_DIR
    official_sizes = {"train": 50_000, "test": 10_000}
    expected = (
        "train/test parquet files with columns img and label, or the CIFAR-10 batches "
        "(data_batch_1..5 and test_batch, python or .bin)"
    )
    how_to_get = (
        "pass task.data_dir=<folder>, or data.source=hf to download uoft-cs/cifar10 from the Hugging "
        "Face hub, or get cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
    )

    def __init__(
        self,
        data_dir: str | None = None,
        source: str = "auto",
        hub_name: str = CIFAR_HUB,
        val_split: str = "seeded",
        split_seed: int = 0,
        num_proc: int = 2,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("seq_len", SEQ_LEN)
        super().__init__(data_dir, source, hub_name, **kwargs)
        if self.seq_len != SEQ_LEN:
            raise ConfigError(
                f"data.seq_len={self.seq_len}: CIFAR-10 images are {SIDE}x{SIDE} = {SEQ_LEN} "
                f"pixels; leave seq_len at {SEQ_LEN}"
            )
        check_choice("val_split", val_split, VAL_SPLITS)
        self.val_split = val_split
        self.split_seed = split_seed
        self.num_proc = max(1, min(num_proc, os.cpu_count() or 1))

    def cache_params(self) -> dict[str, Any]:
        return {
            **self.source_params(),
            "val_split": self.val_split,
            "split_seed": self.split_seed,
            "gray": "tf_rgb_to_grayscale",
        }

    @staticmethod
    def is_release(folder: Path) -> bool:
        return any(
            all((folder / name).is_file() for names in batches.values() for name in names)
            for batches in (PY_BATCHES, BIN_BATCHES)
        )

    def dataset_tokens(self, rows: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and labels of one split of the parquet/hub dataset."""
        from datasets import Image

        # Undecoded, so the files go to our decoder as bytes rather than one PIL object per row.
        files = rows.cast_column("img", Image(decode=False))["img"]
        encoded = [file["bytes"] or Path(file["path"]).read_bytes() for file in files]
        names = [
            f"{split} row {row}" + (f" ({file['path']})" if file["path"] else "")
            for row, file in enumerate(files)
        ]
        return decode_to_tokens(encoded, names, self.num_proc), np.asarray(rows["label"], dtype=np.int64)

    def build_arrays(self) -> ArraySplits:
        tokens = self.read_splits(read_cifar_release, self.dataset_tokens)
        arrays = {
            split: {"input_ids": ids, "lengths": np.full(len(ids), SEQ_LEN, dtype=np.int32), "labels": labels}
            for split, (ids, labels) in tokens.items()
        }
        train, num_train = arrays["train"], len(arrays["train"]["labels"])
        num_val = round(num_train * NUM_VAL / self.official_sizes["train"])
        rng = np.random.default_rng(self.split_seed)
        order = rng.permutation(num_train) if self.val_split == "seeded" else np.arange(num_train)
        cut = num_train - num_val
        return {"train": take(train, order[:cut]), "val": take(train, order[cut:]), "test": arrays["test"]}
