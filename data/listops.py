"""ListOps (Nangia & Bowman 2018, arXiv 1804.06028, at LRA's lengths, Tay et al. 2021, arXiv 2011.04006):
the official generator distribution, the official TSV format, and its DataModule.

Format (``basic_{train,val,test}.tsv``): header ``Source<TAB>Target``, CRLF line endings. ``[MAX 2 9]`` is
stored as ``( ( ( [MAX 2 ) 9 ) ] )``. Tokenisation: ``]`` becomes ``X``, parentheses are dropped, the rest
is split on whitespace; ids follow a fixed vocabulary (the official code's set-ordered vocabulary changes
between processes, so a fixed order is used and stored with the run).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import numpy as np

from data.base import LRADataModule, missing_data_error, pad_ids
from data.cache import ArraySplits, atomic_directory, params_key
from lra.errors import DataError

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
# id 0 is padding; the 15 symbols follow in a fixed order; the last id is out-of-vocabulary.
VOCAB = ("<pad>", *"0123456789", *OPERATORS, "X", "<oov>")
TOKEN_IDS = {token: index for index, token in enumerate(VOCAB)}
OOV_ID = TOKEN_IDS["<oov>"]
FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}

Tree = int | tuple[str, list["Tree"]]


def generate_tree(rng: random.Random, depth: int = 1, max_depth: int = 10, max_args: int = 10) -> Tree:
    """One random expression, drawn as the official generator draws it."""
    draw = rng.random() if depth < max_depth else 1.0
    if draw > 0.25:
        return rng.randint(0, 9)
    operator = rng.choice(OPERATORS)
    num_args = rng.randint(2, max_args)
    return operator, [generate_tree(rng, depth + 1, max_depth, max_args) for _ in range(num_args)]


def tree_length(tree: Tree) -> int:
    """Tokens after tokenisation: one per leaf, two per operator (its name and the closing X)."""
    return 1 if isinstance(tree, int) else 2 + sum(map(tree_length, tree[1]))


APPLY = {"[MIN": min, "[MAX": max, "[MED": lambda v: int(np.median(v)), "[SM": lambda v: sum(v) % 10}


def evaluate(tree: Tree) -> int:
    return tree if isinstance(tree, int) else APPLY[tree[0]]([evaluate(child) for child in tree[1]])


def serialise(tree: Tree) -> str:
    """The official left-nested pair form: ``[MAX 2 9]`` -> ``( ( ( [MAX 2 ) 9 ) ] )``."""
    if isinstance(tree, int):
        return str(tree)
    operator, children = tree
    text = operator
    for child in [*children, END]:
        text = f"( {text} {child if child == END else serialise(child)} )"
    return text


def generate_listops(
    num_examples: int,
    seed: int,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
) -> list[tuple[str, int]]:
    """Distinct (source, target) pairs with ``min_length < length < max_length``, in insertion order."""
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[tuple[str, int]] = []
    while len(examples) < num_examples:
        tree = generate_tree(rng, max_depth=max_depth, max_args=max_args)
        if min_length < tree_length(tree) < max_length and (source := serialise(tree)) not in seen:
            seen.add(source)
            examples.append((source, evaluate(tree)))
    return examples


def write_listops_tsv(path: Path, examples: list[tuple[str, int]]) -> None:
    """Write the official layout: header, tab separated, CRLF (Python's csv writer default)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["Source", "Target"])
        writer.writerows(examples)


def read_listops_tsv(path: Path) -> list[tuple[str, int]]:
    """Read an official ListOps TSV; a malformed row raises naming the file and line."""
    examples = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header != ["Source", "Target"]:
            raise DataError(f"{path}:1: expected the header 'Source<TAB>Target', got {header!r}")
        for row in reader:
            line = reader.line_num
            if len(row) != 2:
                raise DataError(f"{path}:{line}: expected 2 tab-separated fields, got {len(row)}")
            try:
                target = int(row[1])
            except ValueError:
                raise DataError(f"{path}:{line}: target {row[1]!r} is not an integer") from None
            if not 0 <= target <= 9:
                raise DataError(f"{path}:{line}: target {target} is outside 0..9")
            examples.append((row[0], target))
    return examples


def tokenize(source: str) -> list[int]:
    """Official tokenisation with the fixed vocabulary."""
    tokens = source.replace("]", "X").replace("(", "").replace(")", "").split()
    return [TOKEN_IDS.get(token, OOV_ID) for token in tokens]


def encode(examples: list[tuple[str, int]], seq_len: int) -> dict[str, np.ndarray]:
    ids, lengths = pad_ids([source for source, _ in examples], seq_len, tokenize, np.uint8)
    labels = np.array([target for _, target in examples], dtype=np.int64)
    return {"input_ids": ids, "lengths": lengths, "labels": labels}


def generated_listops_dir(root: Path, params: dict[str, int]) -> Path:
    """Generate (once) a ListOps set in the official layout under ``root/listops`` and return its folder.

    ``params``: ``num_train``, ``num_val``, ``num_test``, ``seed``, ``min_length``, ``max_length``.
    """

    def build(tmp: Path) -> None:
        sizes = [params["num_train"], params["num_val"], params["num_test"]]
        examples = generate_listops(sum(sizes), params["seed"], params["min_length"], params["max_length"])
        ends = np.cumsum([0, *sizes])
        for split, start, stop in zip(FILES, ends[:-1], ends[1:], strict=True):
            write_listops_tsv(tmp / FILES[split], examples[start:stop])
        (tmp / "PARAMS").write_text(repr(params) + "\n")

    return atomic_directory(root / "listops" / f"generated-{params_key(params)}", build)


class ListOpsDataModule(LRADataModule):
    """ListOps from the official release (``data_dir``) or from our generator (cached, seeded).

    Args:
        data_dir: folder with ``basic_{train,val,test}.tsv`` (e.g. ``lra_release/listops-1000``); ``None``
            generates data with the official distribution.
        num_train, num_val, num_test: generator sizes (official 96,000 / 2,000 / 2,000).
        generator_seed: seed of the generator (independent of the training seed).
        min_length, max_length: the generator's strict length filter (official 500 < length < 2000).
    """

    task_name = "listops"
    vocab_size = len(VOCAB)
    num_classes = 10

    def __init__(
        self,
        data_dir: str | None = None,
        num_train: int = 96_000,
        num_val: int = 2_000,
        num_test: int = 2_000,
        generator_seed: int = 0,
        min_length: int = 500,
        max_length: int = 2000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.generator = {
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "seed": generator_seed,
            "min_length": min_length,
            "max_length": max_length,
        }

    @property
    def source(self) -> str:
        return "release" if self.data_dir else "generated"

    def cache_params(self) -> dict[str, Any]:
        if self.data_dir:
            return {"data_dir": str(self.data_dir.resolve()), "vocab": VOCAB}
        return {"generator": self.generator, "vocab": VOCAB}

    def tsv_dir(self) -> Path:
        if self.data_dir is None:
            return generated_listops_dir(self.root, self.generator)
        missing = [name for name in FILES.values() if not (self.data_dir / name).is_file()]
        if missing:
            raise missing_data_error(
                "listops",
                self.data_dir,
                f"the official files {', '.join(FILES.values())} (missing: {', '.join(missing)})",
                "point task.data_dir at the extracted release's listops-1000 folder "
                "(lra_release.gz from google-research/long-range-arena), or leave data.data_dir=null to "
                "generate ListOps with the official distribution",
            )
        return self.data_dir

    def build_arrays(self) -> ArraySplits:
        folder = self.tsv_dir()
        return {split: encode(read_listops_tsv(folder / name), self.seq_len) for split, name in FILES.items()}
