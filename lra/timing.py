"""Time and memory measurement, one implementation for the training callbacks (``lra/callbacks.py``), the
efficiency benchmark (``lra/bench.py``, ``lra/bench_levels.py``) and the crossover script
(``lra/crossover.py``).

Device time: CUDA events on a GPU; on a CPU a host clock around each call (``time.perf_counter``, or
``time.thread_time`` for the crossover script, which a busy machine disturbs less). Device memory: the tensor
allocator's peak (CUDA statistics, or the profiler's CPU allocator accounting). Process memory: the resident
set (``/proc/self/status``), what a CPU training run reports. A sweep over sequence lengths (``Sweep``) makes
every point a result row: measured, skipped (time cap, or after running out of memory) or failed.
"""

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
    """Wait for the queued device work (a no-op on a CPU, whose calls return when they are done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[], Any], device: torch.device, calls: int) -> Any:
    """Call ``fn`` at least once (compilation, caches, autotuning happen here); return its last result."""
    result = None
    for _ in range(max(1, calls)):
        result = fn()
    synchronize(device)
    return result


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int,
    cpu_clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` (already warmed up).

    CUDA events on a GPU. On a CPU, ``cpu_clock`` around each call: the calls take milliseconds to seconds,
    and ``torch.utils.benchmark.Timer.timeit`` would run two hidden warm-up calls per measurement.
    """
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


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """(median, IQR) milliseconds of ``repeats`` calls of a warmed-up ``fn``."""
    return median_iqr(time_calls(fn, device, repeats))


def reset_peak_allocated(device: torch.device) -> int:
    """Restart the CUDA allocator's peak at what is allocated now and return that (bytes)."""
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_allocated(device: torch.device) -> int:
    """The CUDA allocator's peak since the last reset (bytes)."""
    return torch.cuda.max_memory_allocated(device)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak of the bytes allocated by ``fn`` above what was live when it started (inputs excluded).

    CUDA: the rise of ``max_memory_allocated``. CPU: the profiler's allocator accounting: every CPU tensor
    allocation and free is an event carrying the allocator's running total, and the peak is the largest
    total minus its value before the first event (live tensor bytes; not the process RSS, and not the
    private scratch of oneDNN/MKL).
    """
    if device.type == "cuda":
        synchronize(device)
        base = reset_peak_allocated(device)
        fn()
        synchronize(device)
        return (peak_allocated(device) - base) / 2**20
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append(
                (event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.total_allocated)
            )
        pending.extend(event.children)
    if not events:
        return 0.0
    events.sort()
    # The running total persists across profiler sessions and misses frees made while none is active, so
    # it is taken relative to its value just before this session's first event.
    _, size, total = events[0]
    baseline = total - size
    peak = max(0, max(total for _, _, total in events) - baseline)
    return peak / 2**20


def is_oom(error: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a plain RuntimeError."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def failure_text(error: BaseException, limit: int) -> str:
    """``Type: first line`` of an exception, cut to ``limit`` characters: what a result row records."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:limit]}"


def release_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached device memory; ``collect`` also runs the garbage collector (slow: only after a failure,
    whose traceback frames may have held large tensors)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class TimeCap:
    """Skips the next, longer point of a series once its predicted wall time exceeds ``budget_s``.

    The prediction extrapolates the last point with the growth exponent measured between the last two
    (clamped to [1, 2.2]; 2 before there are two points), so quadratic methods stop one doubling earlier.
    """

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.history: dict[tuple, list[tuple[int, float]]] = {}

    def record(self, key: tuple, n: int, seconds: float) -> None:
        self.history.setdefault(key, []).append((n, seconds))

    def predicted_s(self, key: tuple, n: int) -> float | None:
        points = self.history.get(key, [])
        if not points:
            return None
        (n_last, t_last), exponent = points[-1], 2.0
        if len(points) > 1 and points[-2][0] < n_last and points[-2][1] > 0:
            n_prev, t_prev = points[-2]
            exponent = min(2.2, max(1.0, math.log(t_last / t_prev) / math.log(n_last / n_prev)))
        return t_last * (n / n_last) ** exponent

    def skip_reason(self, key: tuple, n: int) -> str | None:
        predicted = self.predicted_s(key, n)
        if predicted is not None and predicted > self.budget_s:
            return f"time cap: predicted {predicted:.0f} s > point_budget_s={self.budget_s:g}"
        return None


class Sweep:
    """One row per point, whatever happens to it; shared by both levels.

    A series (one line of a plot) that ran out of memory skips its longer points; a point whose predicted
    wall time exceeds ``point_budget_s`` is skipped; any exception becomes the row's ``error`` and the sweep
    goes on. ``timed_key`` is the row field that says a point was measured (its wall time then feeds the
    time cap).
    """

    def __init__(self, device: torch.device, point_budget_s: float, timed_key: str) -> None:
        self.device, self.timed_key = device, timed_key
        self.time_cap = TimeCap(point_budget_s)
        self.oom_at: dict[tuple, int] = {}

    def point(
        self,
        row: dict[str, Any],
        series: tuple,
        n: int,
        measure: Callable[[], dict[str, Any]],
        skip: str | None = None,
    ) -> dict[str, Any]:
        """``row`` completed with the outcome of ``measure()`` (or why it did not run), the 1-minute load
        and the point's wall time."""
        started = time.perf_counter()
        row.update(oom=False, skipped=None, error=None)
        row.update(self._outcome(series, n, measure, skip))
        row["load1"] = os.getloadavg()[0]
        row["wall_s"] = time.perf_counter() - started
        if row.get(self.timed_key) is not None:
            self.time_cap.record(series, n, row["wall_s"])
        return row

    def _outcome(
        self, series: tuple, n: int, measure: Callable[[], dict[str, Any]], skip: str | None
    ) -> dict[str, Any]:
        if series in self.oom_at:
            return {"skipped": f"out of memory at N={self.oom_at[series]}", "oom": True}
        reason = skip or self.time_cap.skip_reason(series, n)
        if reason is not None:
            return {"skipped": reason}
        failed = False
        try:
            return measure()
        except Exception as error:  # noqa: BLE001 - every failure becomes a row, the sweep goes on
            failed = True
            if is_oom(error):
                self.oom_at[series] = n
                return {"oom": True, "error": failure_text(error, 200)}
            return {"error": failure_text(error, 300)}
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
    """Restart the peak-RSS counter at the current RSS (Linux: ``clear_refs`` 5); False where unsupported.

    A Hydra multirun trains its jobs one after another in one process: without the reset, every job would
    report the largest peak of all the jobs before it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
