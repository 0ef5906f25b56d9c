"""Learning-rate multipliers of the official LRA recipes. Step s counts from 0: the first update has lr 0."""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("rsqrt", "cosine", "linear", "constant")


def lr_multiplier(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor applied to the base learning rate at step ``s``.

    rsqrt: ``min(1, s/W) / sqrt(max(s, W))`` (so ListOps' base 0.05 peaks at 1.58e-3 at s = W);
    cosine: ``min(1, s/W) * max(0, (1 + cos(pi * (p mod 1))) / 2)`` with ``p = max(0, (s - W) / T)``;
    linear: warm-up, then linear decay to 0 at T; constant: warm-up, then 1.
    """
    if name not in SCHEDULES:
        raise ValueError(f"scheduler.name={name!r} is not one of {SCHEDULES}")
    warmup = max(0, int(warmup_steps))
    total = max(1, int(total_steps))

    def warm(step: int) -> float:
        return min(1.0, step / warmup) if warmup > 0 else 1.0

    def rsqrt(step: int) -> float:
        return warm(step) / math.sqrt(max(step, warmup, 1))

    def cosine(step: int) -> float:
        progress = max(0.0, (step - warmup) / total)
        return warm(step) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * (progress % 1.0))))

    def linear(step: int) -> float:
        return warm(step) * max(0.0, 1.0 - max(0, step - warmup) / max(1, total - warmup))

    return {"rsqrt": rsqrt, "cosine": cosine, "linear": linear, "constant": warm}[name]
