"""Crossovers: from which sequence length one method beats another, found on measured points
(``find_crossover``, read by the benchmark reports), and measured for TaylorShift's ``n0: table``.

    python -m lra.crossover                                  # cpu, float32, d = 16 32 64: prints the table
    python -m lra.crossover --write                          # ... and merges it into the committed table
    python -m lra.crossover --device cuda --dtype bfloat16 --head-dims 32 64 --write

For each d, forward+backward of TaylorShift in both modes on the same inputs, interleaved, best of
``--repeats``, on a geometric grid of N; the result is the smallest N from which the efficient mode is faster
(log-interpolated). CPU time is the calling thread's (``time.thread_time``, one intra-op thread), which a busy
machine disturbs less than wall time. The table is ``models/attention/crossover.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from data.cache import atomic_write_text
from lra.timing import time_calls
from models.attention.crossover import CROSSOVER_TABLE, crossover_n0
from models.attention.taylorshift import TaylorShiftAttention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Crossover:
    """Where a candidate starts beating a reference on the measured grid. ``status``: ``crossed`` (it wins
    from ``n`` on and lost at the point before), ``always``, ``never`` (it loses at the largest compared N) or
    ``unknown`` (no N where both were measured). ``n_interp`` interpolates the ratio in log-log between the
    two bracketing points (None when the reference ran out of memory there)."""

    status: str
    n: int | None = None
    n_interp: float | None = None
    n_min: int | None = None
    n_max: int | None = None

    def text(self) -> str:
        if self.status == "always":
            return f"≤ {self.n_min:,}"
        if self.status == "never":
            return f"> {self.n_max:,}"
        if self.status == "crossed":
            return f"{self.n:,}" + (f" (≈{self.n_interp:,.0f})" if self.n_interp is not None else "")
        return "n/a"


def find_crossover(
    ns: Iterable[int], candidate: Iterable[float | None], reference: Iterable[float | None]
) -> Crossover:
    """The smallest measured N from which ``candidate < reference`` at every larger measured N. Values:
    lower is better, ``math.inf`` for out of memory (loses to any finite value), None where not measured."""
    points = sorted(
        (n, c, r)
        for n, c, r in zip(ns, candidate, reference, strict=True)
        if c is not None and r is not None and not (math.isinf(c) and math.isinf(r))
    )
    if not points:
        return Crossover("unknown")
    wins = [c < r for _, c, r in points]
    n_min, n_max = points[0][0], points[-1][0]
    if not wins[-1]:
        return Crossover("never", n_min=n_min, n_max=n_max)
    first = len(wins) - wins[::-1].index(False) if False in wins else 0  # the first win after the last loss
    if first == 0:
        return Crossover("always", n=n_min, n_min=n_min, n_max=n_max)
    (n_lo, c_lo, r_lo), (n_hi, c_hi, r_hi) = points[first - 1], points[first]
    interp = None
    if all(math.isfinite(x) and x > 0 for x in (c_lo, r_lo, c_hi, r_hi)):
        rho_lo, rho_hi = math.log(c_lo / r_lo), math.log(c_hi / r_hi)
        fraction = rho_lo / (rho_lo - rho_hi) if rho_lo != rho_hi else 1.0
        interp = math.exp(math.log(n_lo) + fraction * (math.log(n_hi) - math.log(n_lo)))
    return Crossover("crossed", n=n_hi, n_interp=interp, n_min=n_min, n_max=n_max)


def time_modes(
    seq_len: int,
    head_dim: int,
    batch: int,
    heads: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> dict[str, float]:
    """Best forward+backward milliseconds of the direct and the efficient mode on the same inputs."""
    generator = torch.Generator().manual_seed(seq_len)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v, grad = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    modules = {
        mode: TaylorShiftAttention(heads, head_dim, seq_len, mode=mode).to(device, dtype)
        for mode in ("direct", "efficient")
    }

    def step(module: TaylorShiftAttention) -> None:
        for leaf in leaves:
            leaf.grad = None
        module(*leaves).backward(grad)

    for module in modules.values():
        step(module)  # warm-up
    times: dict[str, list[float]] = {mode: [] for mode in modules}
    for _ in range(repeats):  # interleaved
        for mode, module in modules.items():
            times[mode] += time_calls(
                lambda module=module: step(module), device, 1, cpu_clock=time.thread_time
            )
    return {mode: min(measured) for mode, measured in times.items()}


def measure_n0(
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    batch: int = 4,
    heads: int = 4,
    repeats: int = 5,
    max_len: int = 8192,
) -> int | None:
    """Smallest N from which the efficient mode is faster (None: direct wins up to ``max_len``), on N = 16,
    16·√2, ... up to the first N where it wins."""
    lengths, direct, efficient = [], [], []
    seq_len = 16
    while seq_len <= max_len:
        measured = time_modes(seq_len, head_dim, batch, heads, device, dtype, repeats)
        lengths.append(seq_len)
        direct.append(measured["direct"])
        efficient.append(measured["efficient"])
        print(
            f"  d={head_dim} N={seq_len}: direct {direct[-1]:.2f} ms, efficient {efficient[-1]:.2f} ms",
            flush=True,
        )
        found = find_crossover(lengths, efficient, direct)
        if found.status == "always":
            return found.n
        if found.status == "crossed":
            return round(found.n_interp) if found.n_interp is not None else found.n
        seq_len = round(seq_len * math.sqrt(2))
    return None


def merge_table(path: str, device_kind: str, dtype_name: str, measured: dict[int, int]) -> dict:
    """The table at ``path`` (empty if missing) with ``measured`` under ``[device_kind][dtype_name]``."""
    table = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    entries = table.setdefault(device_kind, {}).setdefault(dtype_name, {})
    entries.update({str(d): n for d, n in sorted(measured.items())})
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--head-dims", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (thread time needs 1)")
    parser.add_argument("--write", action="store_true", help=f"merge the result into {CROSSOVER_TABLE}")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    measured: dict[int, int] = {}
    for head_dim in args.head_dims:
        n0 = measure_n0(head_dim, device, dtype, args.batch, args.heads, args.repeats, args.max_len)
        print(f"d={head_dim}: measured N0 = {n0} (theory {crossover_n0(head_dim)})", flush=True)
        if n0 is not None:
            measured[head_dim] = n0
    table = merge_table(str(CROSSOVER_TABLE), args.device, args.dtype, measured)
    print(json.dumps(table, indent=2))
    if args.write:
        atomic_write_text(CROSSOVER_TABLE, json.dumps(table, indent=2) + "\n")
        print(f"wrote {CROSSOVER_TABLE}")


if __name__ == "__main__":
    main()
