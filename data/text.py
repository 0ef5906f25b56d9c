"""Text (LRA, Tay et al. 2021, arXiv 2011.04006): byte-level IMDb sentiment (Maas et al. 2011, ACL),
2 classes.

Encoding (official): the review's UTF-8 bytes with ASCII whitespace stripped at both ends (TFDS strips the raw
bytes, so a final U+00A0 or U+0085 stays), id = byte + 1, truncated to ``seq_len`` and right-padded with 0;
vocab 257. Splits: the 25k train set, and the 25k test set as both validation and test (no val split exists
officially).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.base import check_choice, pad_ids, take
from data.cache import ArraySplits
from data.sources import SHARED_DATA, LocatedSource

IMDB_HUB = "stanfordnlp/imdb"
DEFAULT_PARQUET_DIR = SHARED_DATA / "imdb"
BYTE_VOCAB = 257
STRIP_MODES = ("ascii", "unicode", "none")
UNITS = ("bytes", "chars")
VAL_SPLITS = ("test", "train_holdout")
HOLDOUT_FRACTION = 0.1
# ``unit=chars``: code points 0..254 keep their own id (cp + 1); every other code point shares the last id.
CHAR_OOV_ID = BYTE_VOCAB - 1


def strip_review(raw: bytes, mode: str) -> bytes:
    """``ascii``: strip ASCII whitespace from the bytes (TFDS); ``unicode``: ``str.strip()``; ``none``."""
    if mode == "ascii":
        return raw.strip()  # bytes.strip() removes only b" \t\n\r\x0b\x0c"
    return raw.decode("utf-8").strip().encode("utf-8") if mode == "unicode" else raw


def encode_bytes(docs: Sequence[bytes], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level ids: byte + 1, pad 0 (see ``pad_ids``)."""
    return pad_ids(docs, seq_len, lambda doc: np.frombuffer(doc[:seq_len], np.uint8).astype(np.uint16) + 1)


def encode_chars(docs: Sequence[bytes], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Code-point ids: cp + 1, at most ``CHAR_OOV_ID`` (256); pad 0 (see ``pad_ids``)."""

    def to_ids(doc: bytes) -> np.ndarray:
        points = np.frombuffer(doc.decode("utf-8")[:seq_len].encode("utf-32-le"), dtype=np.uint32)
        return np.minimum(points + 1, CHAR_OOV_ID).astype(np.uint16)

    return pad_ids(docs, seq_len, to_ids)


def read_aclimdb(folder: Path, split: str) -> tuple[list[bytes], np.ndarray]:
    """The original ``aclImdb/<split>/{neg,pos}/<id>_<rating>.txt`` files as raw bytes (neg, pos; by id)."""
    docs: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(("neg", "pos")):
        files = sorted((folder / split / name).glob("*.txt"), key=lambda file: int(file.stem.split("_")[0]))
        docs.extend(file.read_bytes() for file in files)
        labels.extend([label] * len(files))
    return docs, np.array(labels, dtype=np.int64)


class TextDataModule(LocatedSource):
    """Byte-level IMDb from local parquet files, the Hugging Face hub, or the original aclImdb folder.

    Args:
        data_dir: a folder with ``train``/``test`` parquet files (columns ``text``, ``label``) or the
            extracted ``aclImdb`` folder; ``None`` uses the project copy ``../shared/data/imdb``, else the
            hub.
        source: ``auto``, ``parquet``, ``hf`` or ``release`` (see data/sources.py).
        hub_name: the hub dataset for ``source=hf``.
        unit: ``bytes`` (official) or ``chars`` (Unicode code points; 0..254 own ids, the rest one OOV id).
        strip: ``ascii`` (official, on the bytes), ``unicode`` (``str.strip()``) or ``none``.
        val_split: ``test`` (official: validation is the test set) or ``train_holdout`` (a seeded 10% of
            train).
        split_seed: seeds the fixed order of the train set and the holdout. The official reader sees TFDS's
            shuffled record order; the parquet copy and the hub are sorted by label, and a 256-example shuffle
            buffer over a sorted set would give one-class batches.
    """

    task_name = "text"
    vocab_size = BYTE_VOCAB
    num_classes = 2
    default_dir = DEFAULT_PARQUET_DIR
    official_sizes = {"train": 25_000, "test": 25_000}
    expected = (
        "train/test parquet files with columns text and label, or the aclImdb folder "
        "(train/{neg,pos}/*.txt, test/{neg,pos}/*.txt)"
    )
    how_to_get = (
        "pass task.data_dir=<folder>, or data.source=hf to download stanfordnlp/imdb from the Hugging "
        "Face hub, or get aclImdb_v1.tar.gz from https://ai.stanford.edu/~amaas/data/sentiment/"
    )

    def __init__(
        self,
        data_dir: str | None = None,
        source: str = "auto",
        hub_name: str = IMDB_HUB,
        unit: str = "bytes",
        strip: str = "ascii",
        val_split: str = "test",
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, source, hub_name, **kwargs)
        check_choice("unit", unit, UNITS)
        check_choice("strip", strip, STRIP_MODES)
        check_choice("val_split", val_split, VAL_SPLITS)
        self.unit = unit
        self.strip = strip
        self.val_split = val_split
        self.split_seed = split_seed

    def cache_params(self) -> dict[str, Any]:
        return {
            **self.source_params(),
            "unit": self.unit,
            "strip": self.strip,
            "val_split": self.val_split,
            "split_seed": self.split_seed,
        }

    @staticmethod
    def is_release(folder: Path) -> bool:
        return all((folder / split / name).is_dir() for split in ("train", "test") for name in ("neg", "pos"))

    def build_arrays(self) -> ArraySplits:
        raw = self.read_splits(
            read_aclimdb,
            lambda rows, _: (
                [text.encode("utf-8") for text in rows["text"]],
                np.asarray(rows["label"], np.int64),
            ),
        )
        encode = encode_bytes if self.unit == "bytes" else encode_chars
        encoded = {}
        for split, (docs, labels) in raw.items():
            ids, lengths = encode([strip_review(doc, self.strip) for doc in docs], self.seq_len)
            encoded[split] = {"input_ids": ids, "lengths": lengths, "labels": labels}
        train, test = encoded["train"], encoded["test"]
        order = np.random.default_rng(self.split_seed).permutation(len(train["labels"]))
        holdout = self.val_split == "train_holdout"
        num_val = round(len(order) * HOLDOUT_FRACTION) if holdout else 0
        val = take(train, order[:num_val]) if holdout else test
        return {"train": take(train, order[num_val:]), "val": val, "test": test}
