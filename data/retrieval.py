"""Retrieval (LRA, Tay et al. 2021, arXiv 2011.04006): do two papers of the ACL Anthology Network
(Radev et al. 2013) cite each other? Byte level, two documents, 2 classes.

Format (``new_aan_pairs.{train,eval,test}.tsv`` in the release's ``tsv_data``): no header, one pair per
line, 5 tab-separated fields ``label, id1, id2, text1, text2``. The label is written as a float (``1.0``)
and read as float then cast to int. Quote characters are ordinary text: the official reader turns quote
handling off, so lines are split on tabs and nothing else. Encoding: each text cut to its first 10,000
bytes, id = byte + 1, truncated to ``seq_len`` (4000) and right-padded with 0; both documents are encoded
alike (the model runs one shared encoder over each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data.base import LRADataModule, missing_data_error
from data.cache import ArraySplits
from data.text import BYTE_VOCAB, encode_bytes
from lra.errors import DataError

FILES = {
    "train": "new_aan_pairs.train.tsv",
    "val": "new_aan_pairs.eval.tsv",
    "test": "new_aan_pairs.test.tsv",
}
MAX_DOC_BYTES = 10_000
NUM_FIELDS = 5
# Where the files may sit relative to ``data_dir``: the folder itself, or the extracted release above it.
LAYOUTS = (".", "tsv_data", "lra_release/tsv_data")


def read_aan_tsv(path: Path, keep_bytes: int = MAX_DOC_BYTES) -> tuple[list[bytes], list[bytes], np.ndarray]:
    """``(text1, text2, labels [N] int64)`` of one AAN pairs file, each text cut to ``keep_bytes`` (at most
    the official 10,000); lines are split on tab only, as in the file. A malformed line raises naming it."""
    keep = min(keep_bytes, MAX_DOC_BYTES)
    texts1, texts2, labels = [], [], []
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip(b"\n").removesuffix(b"\r")
            if not line:
                continue
            fields = line.split(b"\t")
            if len(fields) != NUM_FIELDS:
                raise DataError(
                    f"{path}:{line_number}: expected {NUM_FIELDS} tab-separated fields "
                    f"(label, id1, id2, text1, text2), got {len(fields)}"
                )
            try:
                value = float(fields[0])
            except ValueError:
                label = fields[0].decode(errors="replace")
                raise DataError(f"{path}:{line_number}: label {label!r} is not a number") from None
            if value not in (0.0, 1.0):
                raise DataError(f"{path}:{line_number}: label {value} is not 0 or 1")
            labels.append(int(value))
            texts1.append(fields[3][:keep])
            texts2.append(fields[4][:keep])
    return texts1, texts2, np.array(labels, dtype=np.int64)


class RetrievalDataModule(LRADataModule):
    """AAN document pairs from the LRA release (there is no substitute; tests use a tiny fixture).

    Args:
        data_dir: the release's ``tsv_data`` folder (or the folder above it) holding
            ``new_aan_pairs.{train,eval,test}.tsv``.
        seq_len (base): bytes per document (official 4000).
    """

    task_name = "retrieval"
    vocab_size = BYTE_VOCAB
    num_classes = 2
    dual = True
    official_sizes = {"train": 147_086, "val": 18_090, "test": 17_437}

    def __init__(self, data_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else None

    @property
    def source(self) -> str:
        return "release"

    def tsv_dir(self) -> Path:
        """The folder that holds all three files, or an error that says where to get them."""
        how_to_get = (
            "download lra_release.gz from google-research/long-range-arena (README), extract it "
            "and pass task.data_dir=<...>/lra_release/tsv_data; no AAN data is available offline"
        )
        expected = f"the official files {', '.join(FILES.values())}"
        if self.data_dir is None:
            raise missing_data_error("retrieval", Path("<task.data_dir is not set>"), expected, how_to_get)
        for layout in LAYOUTS:
            folder = self.data_dir / layout
            if all((folder / name).is_file() for name in FILES.values()):
                return folder.resolve()
        missing = [name for name in FILES.values() if not (self.data_dir / name).is_file()]
        raise missing_data_error(
            "retrieval", self.data_dir, f"{expected} (missing: {', '.join(missing)})", how_to_get
        )

    def cache_params(self) -> dict[str, Any]:
        return {"data_dir": str(self.tsv_dir()), "max_doc_bytes": MAX_DOC_BYTES}

    def build_arrays(self) -> ArraySplits:
        folder, splits = self.tsv_dir(), {}
        for split, name in FILES.items():
            texts1, texts2, labels = read_aan_tsv(folder / name, self.seq_len)
            splits[split] = {"labels": labels}
            for suffix, texts in (("", texts1), ("_2", texts2)):
                splits[split]["input_ids" + suffix], splits[split]["lengths" + suffix] = encode_bytes(
                    texts, self.seq_len
                )
        self.check_sizes({split: len(arrays["labels"]) for split, arrays in splits.items()})
        return splits
