"""Time and memory measurement shared by the training callbacks, the efficiency benchmark and the crossover
script: CUDA events or a host clock, the allocator's peak, the process RSS, and ``Sweep``, which turns every
point of a benchmark (measured, skipped, out of memory, failed) into a result row."""

from __future__ import annotations

import gc
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int,
    cpu_clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of a warmed-up ``fn``: CUDA events on a GPU, ``cpu_clock``
    on a CPU (``torch.utils.benchmark.Timer`` would add hidden warm-up calls to every measurement)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = cpu_clock()
            fn()
            times.append(1000.0 * (cpu_clock() - started))
    return times


def median_iqr(times: list[float]) -> tuple[float, float]:
    """Median and interquartile range: robust to the odd slow call of a shared machine."""
    if len(times) < 2:
        return times[0], 0.0
    quartiles = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), quartiles[2] - quartiles[0]


def measure(
    fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int, memory: bool = True
) -> tuple[Any, float | None, float, float]:
    """(last warm-up result, peak MB or None, median ms, IQR ms) of ``fn``: at least one warm-up call
    (compilation, caches, autotuning), one call for peak memory, then ``repeats`` timed calls."""
    result = None
    for _ in range(max(1, warmup)):
        result = fn()
    synchronize(device)
    peak_mb = peak_memory_mb(fn, device) if memory else None
    return result, peak_mb, *median_iqr(time_calls(fn, device, repeats))


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak of the tensor bytes allocated by ``fn`` above what was live when it started (inputs excluded).

    CUDA: the rise of ``max_memory_allocated``. CPU: the profiler's allocator events, each carrying the
    allocator's running total (live tensor bytes; not the process RSS, not oneDNN/MKL scratch).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            events.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
        pending.extend(event.children)
    if not events:
        return 0.0
    # The running total persists across profiler sessions and misses frees made while none is active, so
    # it is taken relative to its value just before this session's first event.
    _, size, total = min(events)
    return max(0, max(total for _, _, total in events) - (total - size)) / 2**20


def _is_oom(error: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a plain RuntimeError."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def release_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached device memory; ``collect`` first frees tensors held by a failure's traceback frames."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class TimeCap:
    """Skips the next, longer point of a series once its predicted wall time exceeds ``budget_s``: the last
    point extrapolated with the growth exponent of the last two (clamped to [1, 2.2]; 2 from one point)."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.history: dict[tuple, list[tuple[int, float]]] = {}

    def record(self, key: tuple, n: int, seconds: float) -> None:
        self.history.setdefault(key, []).append((n, seconds))

    def skip_reason(self, key: tuple, n: int) -> str | None:
        points = self.history.get(key)
        if not points:
            return None
        (n_last, t_last), exponent = points[-1], 2.0
        if len(points) > 1 and points[-2][0] < n_last and points[-2][1] > 0:
            n_prev, t_prev = points[-2]
            exponent = min(2.2, max(1.0, math.log(t_last / t_prev) / math.log(n_last / n_prev)))
        predicted = t_last * (n / n_last) ** exponent
        if predicted > self.budget_s:
            return f"time cap: predicted {predicted:.0f} s > point_budget_s={self.budget_s:g}"
        return None


class Sweep:
    """One row per point, whatever happens to it. A series (one line of a plot) that ran out of memory
    skips its longer points, a point predicted to exceed ``point_budget_s`` is skipped, and any exception
    becomes the row's ``error``. ``timed_key``: the row field that says a point was measured."""

    def __init__(self, device: torch.device, point_budget_s: float, timed_key: str) -> None:
        self.device, self.timed_key = device, timed_key
        self.time_cap = TimeCap(point_budget_s)
        self.oom_at: dict[tuple, int] = {}

    def point(
        self,
        row: dict[str, Any],
        series: tuple,
        n: int,
        run: Callable[[], dict[str, Any]],
        skip: str | None = None,
    ) -> dict[str, Any]:
        """``row`` completed with ``run()`` (or why it did not run), the 1-minute load and wall time."""
        started = time.perf_counter()
        row.update(oom=False, skipped=None, error=None)
        row.update(self._outcome(series, n, run, skip))
        row["load1"] = os.getloadavg()[0]
        row["wall_s"] = time.perf_counter() - started
        if row.get(self.timed_key) is not None:
            self.time_cap.record(series, n, row["wall_s"])
        return row

    def _outcome(
        self, series: tuple, n: int, run: Callable[[], dict[str, Any]], skip: str | None
    ) -> dict[str, Any]:
        if series in self.oom_at:
            return {"skipped": f"out of memory at N={self.oom_at[series]}", "oom": True}
        reason = skip or self.time_cap.skip_reason(series, n)
        if reason is not None:
            return {"skipped": reason}
        failed = False
        try:
            return run()
        except Exception as error:  # noqa: BLE001 - every failure becomes a row, the sweep goes on
            failed = True
            oom = _is_oom(error)
            if oom:
                self.oom_at[series] = n
            text = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][: 200 if oom else 300]}"
            return {"oom": True, "error": text} if oom else {"error": text}
        finally:
            release_memory(self.device, collect=failed)


def process_peak_rss_gb() -> float:
    """Peak resident memory of this process: ``VmHWM`` on Linux (resettable), else ``ru_maxrss``."""
    peak_kib = _proc_status_kib("VmHWM")
    if peak_kib is not None:
        return peak_kib / 1024**2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**3 if sys.platform == "darwin" else 1024**2)


def process_rss_gb() -> float | None:
    """Current resident memory of this process (Linux only, else None)."""
    rss_kib = _proc_status_kib("VmRSS")
    return None if rss_kib is None else rss_kib / 1024**2


def reset_process_peak_rss() -> bool:
    """Restart the peak-RSS counter at the current RSS (Linux ``clear_refs`` 5); False where unsupported.
    A Hydra multirun trains its jobs in one process: without it each job would inherit the earlier peaks."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            return next((int(line.split()[1]) for line in handle if line.startswith(field + ":")), None)
    except (OSError, ValueError, IndexError):
        return None
