"""Where TaylorShift's efficient mode overtakes the direct one: the break-evens N0, N1 of Nauen, Palacio and
Dengel (2024, arXiv 2403.02920) and the measured table ``crossover.json`` (``{device kind: {dtype: {head dim:
N0}}}``, written by ``python -m lra.crossover``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

CROSSOVER_TABLE = Path(__file__).with_name("crossover.json")
_crossover_table: dict[str, Any] = json.loads(CROSSOVER_TABLE.read_text()) if CROSSOVER_TABLE.exists() else {}


def measured_n0(device_kind: str, dtype: torch.dtype, head_dim: int) -> int | None:
    """The crossover measured for ``device_kind`` (``cpu``, ``cuda``), dtype and d, or None."""
    entry = (
        _crossover_table.get(device_kind, {}).get(str(dtype).removeprefix("torch."), {}).get(str(head_dim))
    )
    return None if entry is None else int(entry)


def crossover_n0(head_dim: int) -> int:
    """FLOP break-even N0 = d² + d + 1 between the direct and efficient modes, per head."""
    return head_dim * head_dim + head_dim + 1


def crossover_n1(head_dim: int) -> int:
    """Memory break-even N1, the positive root of 2N² = (d+1)²N + d²(d+1), rounded."""
    d = head_dim
    return round((d * d + 2 * d + 1 + math.sqrt(d**4 + 12 * d**3 + 14 * d**2 + 4 * d + 1)) / 4)


def threshold_n0(n0: int | str, device_kind: str, dtype: torch.dtype, head_dim: int) -> int:
    """The N above which the efficient mode runs: an int ``n0``, the ``theory``, or the ``table`` entry
    (the theory where there is none)."""
    if not isinstance(n0, str):
        return n0
    measured = measured_n0(device_kind, dtype, head_dim) if n0 == "table" else None
    return crossover_n0(head_dim) if measured is None else measured
