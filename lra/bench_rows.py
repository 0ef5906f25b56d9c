"""A benchmark's ``rows.jsonl``, written and read back as tables: operator rows indexed by setting, head
size, variant and N, with the crossovers between variants, and how a row that was not measured is shown.
Read by the reports, their plots and the head-size analysis."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lra.crossover import Crossover

METRICS = {"fwd_ms": "forward (ms)", "fwd_bwd_ms": "forward + backward (ms)", "peak_mb": "peak memory (MB)"}


class Rows:
    """Append-only JSONL sink: a row is on disk as soon as it is emitted (the GPU check's parent and stage
    processes write the same file in turn); operator and model rows are also echoed to stdout."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def emit(self, row: dict[str, Any]) -> None:
        from lra.summary import to_jsonable

        with self.path.open("a") as sink:
            sink.write(json.dumps(to_jsonable(row), sort_keys=True, default=str) + "\n")
        if row["kind"] in ("operator", "model"):
            print_row(row)


def print_row(row: dict[str, Any]) -> None:
    operator = row["kind"] == "operator"
    where = f"N={row['seq_len']:>6} d={row.get('head_dim')}" if operator else f"model N={row['seq_len']:>5}"
    result = problem_text(row)
    if not result:
        result = (
            f"fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} ms"
            if operator
            else f"step {row['step_ms']:9.1f} ms  {row['steps_per_s']:6.2f} steps/s"
        ) + f"  peak {row['peak_mb']:8.1f} MB"
    print(f"{where}  {row['label']:<36} {result}", flush=True)


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file ([] when it is missing); a line cut off by a killed process is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _setting(row: dict[str, Any]) -> tuple:
    return row["dtype"], row["batch"], row["heads"], row["causal"], row["masked"]


def setting_text(setting: tuple) -> str:
    dtype, batch, heads, causal, masked = setting
    causal_text, masked_text = "causal" if causal else "non-causal", "masked" if masked else "unmasked"
    return f"{dtype}, B={batch}, h={heads}, {causal_text}, {masked_text}"


def status_text(row: dict[str, Any]) -> str | None:
    """How a table cell shows a row that has no value to show (None: it has one)."""
    if row.get("oom"):
        return "OOM"
    if row.get("skipped"):
        return "skip"
    if row.get("error"):
        return "error"
    return "gate ✗" if row.get("gate_ok") is False else None


def problem_text(row: dict[str, Any]) -> str:
    """Why a point was not measured ("OOM" first where it ran out of memory); "" when it was."""
    why = row.get("skipped") or row.get("error")
    return f"{'OOM ' if row.get('oom') else ''}{why}" if why else ""


def metric_value(row: dict[str, Any] | None, metric: str) -> float | None:
    """A row's metric for the crossover finder: the value, inf when out of memory, else None."""
    if row is None:
        return None
    if row.get("oom"):
        return math.inf
    return None if status_text(row) else row.get(metric)


class OperatorTable:
    """Operator rows indexed by (setting, head_dim, label, N)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = [row for row in rows if row.get("kind") == "operator"]
        self.index = {(_setting(r), r["head_dim"], r["label"], r["seq_len"]): r for r in self.rows}
        self.settings = list(dict.fromkeys(_setting(r) for r in self.rows))
        self.labels = list(dict.fromkeys(r["label"] for r in self.rows))
        self.quadratic = {r["label"] for r in self.rows if r.get("quadratic")}

    def head_dims(self, setting: tuple) -> list[int]:
        return sorted({d for s, d, _, _ in self.index if s == setting})

    def grids(self) -> list[tuple[tuple, int]]:
        """Every (setting, head_dim) measured."""
        return [(setting, head_dim) for setting in self.settings for head_dim in self.head_dims(setting)]

    def lengths(self, setting: tuple, head_dim: int) -> list[int]:
        return sorted({n for s, d, _, n in self.index if (s, d) == (setting, head_dim)})

    def get(self, setting: tuple, head_dim: int, label: str, n: int) -> dict[str, Any] | None:
        return self.index.get((setting, head_dim, label, n))

    def series(self, setting: tuple, head_dim: int, label: str, metric: str) -> tuple[list[int], list]:
        ns = self.lengths(setting, head_dim)
        return ns, [metric_value(self.get(setting, head_dim, label, n), metric) for n in ns]

    def crossover(
        self, setting: tuple, head_dim: int, candidate: str, reference: str, metric: str
    ) -> Crossover:
        from lra.crossover import find_crossover

        ns, ours = self.series(setting, head_dim, candidate, metric)
        _, theirs = self.series(setting, head_dim, reference, metric)
        return find_crossover(ns, ours, theirs)

    def crossover_texts(self, setting: tuple, head_dim: int, candidate: str, reference: str) -> list[str]:
        """The crossover against ``reference`` for each of ``METRICS``, as table cells."""
        return [self.crossover(setting, head_dim, candidate, reference, m).text() for m in METRICS]

    def flop_parity(self, setting: tuple, head_dim: int, label: str) -> float | None:
        """N* = F_X/(4·B·h·N·d): where softmax's 4·B·h·N²·d forward FLOPs equal X's, so at equal achieved
        FLOP/s X is faster from there on; defined when X's FLOPs are linear in N."""
        per_token = [
            r["flops"] / (r["batch"] * r["heads"] * r["seq_len"] * r["head_dim"] * 4)
            for n in self.lengths(setting, head_dim)
            if (r := self.get(setting, head_dim, label, n)) and r.get("flops")
        ]
        if len(per_token) < 2:
            return None
        return per_token[0] if max(per_token) <= 1.01 * min(per_token) else None


def device_label(device_type: str, device_name: str) -> str:
    """A run's default label: ``cpu``, or the GPU's name in lower case with dashes."""
    if device_type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
