"""Measure TaylorShift's direct/efficient crossover N0 for this device and dtype, for ``mode: auto``.

    python -m lra.crossover                                  # cpu, float32, d = 16 32 64: prints the table
    python -m lra.crossover --write                          # ... and merges it into the committed table
    python -m lra.crossover --device cuda --dtype bfloat16 --head-dims 32 64 --write

For each head dimension d it times forward+backward of the TaylorShift module in both modes on the same
inputs, interleaved, best of ``--repeats``, on a geometric grid of N, and reports the smallest N from which
the efficient mode is at least as fast (log-interpolated between the two grid points around the switch).
On CPU the time is the calling thread's CPU time (``time.thread_time``, with one intra-op thread), so a busy
machine disturbs it less than wall time; on CUDA it is wall time between synchronisations. The table lives in
``models/attention/crossover.json``, keyed by device kind, dtype and d; ``TaylorShiftOptions`` reads it when
``n0: table`` (the default) and falls back to the FLOP theory d² + d + 1 where it has no entry.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch

from models.attention.taylorshift import CROSSOVER_TABLE, TaylorShiftAttention, crossover_n0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _seconds(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cpu":
        start = time.thread_time()
        fn()
        return time.thread_time() - start
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_modes(
    seq_len: int,
    head_dim: int,
    batch: int,
    heads: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> dict[str, float]:
    """Best forward+backward seconds of the direct and the efficient mode on the same inputs."""
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

    best = {mode: math.inf for mode in modules}
    for module in modules.values():
        step(module)  # warm-up
    for _ in range(repeats):
        for mode, module in modules.items():
            best[mode] = min(best[mode], _seconds(lambda module=module: step(module), device))
    return best


def measure_n0(
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    batch: int = 4,
    heads: int = 4,
    repeats: int = 5,
    max_len: int = 8192,
    verbose: bool = True,
) -> int | None:
    """Smallest N from which the efficient mode is not slower (None: direct wins up to ``max_len``)."""
    previous: tuple[int, float] | None = None  # (N, log time ratio efficient/direct) of the last grid point
    seq_len = 16
    while seq_len <= max_len:
        times = time_modes(seq_len, head_dim, batch, heads, device, dtype, repeats)
        log_ratio = math.log(times["efficient"] / times["direct"])
        if verbose:
            print(
                f"  d={head_dim} N={seq_len}: direct {times['direct'] * 1e3:.2f} ms, "
                f"efficient {times['efficient'] * 1e3:.2f} ms",
                flush=True,
            )
        if log_ratio <= 0:
            if previous is None:
                return seq_len
            # Log-linear interpolation of the ratio between the last losing and this winning point.
            n_prev, r_prev = previous
            t = r_prev / (r_prev - log_ratio)
            return round(math.exp(math.log(n_prev) + t * (math.log(seq_len) - math.log(n_prev))))
        previous = (seq_len, log_ratio)
        seq_len = round(seq_len * math.sqrt(2))
    return None


def merge_table(path: str, device_kind: str, dtype_name: str, measured: dict[int, int]) -> dict:
    """The table at ``path`` with ``measured`` written under ``[device_kind][dtype_name]``."""
    try:
        with open(path) as handle:
            table = json.load(handle)
    except FileNotFoundError:
        table = {}
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
        with open(CROSSOVER_TABLE, "w") as handle:
            json.dump(table, handle, indent=2)
            handle.write("\n")
        print(f"wrote {CROSSOVER_TABLE}")


if __name__ == "__main__":
    main()
