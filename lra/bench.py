"""Efficiency benchmark: every registered attention, time and memory against sequence length (spec 7).

    python -m lra.bench                           # CPU grid (conf/bench/default.yaml) into outputs/bench/
    python -m lra.bench bench=gpu                 # GPU grid (bf16, up to 64k, SDPA backends pinned)
    python -m lra.bench bench=smoke output_dir=/tmp/bench
    python -m lra.bench output_dir=results/efficiency   # regenerate the committed CPU benchmark
    python -m lra.bench logger=wandb              # also log the rows as a W&B table (offline by default)

Two levels, both interleaved so that every method sees the same inputs in the same process:

* operator: the attention module alone on fresh N(0, 1) ``q, k, v [B, H, N, d]``; forward (no grad) and
  forward + backward (random dO) times, median and IQR over repeats after warm-up; peak memory of fwd+bwd
  with the inputs excluded; a correctness gate against the attention's first variant.
* model: the whole LRA model of a task (``conf/config.yaml`` composed with ``task=...``), one training step
  (forward, backward, optimiser step) at each sequence length: steps/s and peak memory, for the report's
  LRA-paper-style table relative to softmax.

The attentions come from ``conf/attention/*.yaml`` (the registry); a preset lists per-attention variants
(constructor overrides such as TaylorShift modes or SDPA backends). Every outcome is a row of
``<output_dir>/<label>/rows.jsonl`` (``output_dir`` defaults to the Hydra run directory, never to the
committed ``results/``): measured, out of memory, skipped (and why) or failed; then
``lra/bench_report.py`` writes ``report.md`` and the plots from that file alone.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from lra.errors import ConfigError
from lra.registry import ATTENTION_DIR, attention_factory, registered_attentions
from lra.summary import device_name, git_commit, to_jsonable
from models.attention.base import Attention

# Keys of a variant that steer the benchmark rather than the attention's constructor.
VARIANT_BENCH_KEYS = ("quadratic", "compile")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration of a registered attention.

    Args:
        attention: the registry name (``conf/attention/<attention>.yaml``).
        overrides: constructor keys merged over the YAML (e.g. ``{"mode": "direct"}``).
        quadratic: the method materialises N×N, so it runs only up to ``max_n_quadratic``.
        compile: wrap the module in ``torch.compile`` (compilation happens in the warm-up).
    """

    attention: str
    overrides: dict[str, Any] = field(default_factory=dict)
    quadratic: bool = False
    compile: bool = False

    @property
    def variant(self) -> str:
        parts = [f"{key}={value}" for key, value in self.overrides.items()]
        parts += ["compile"] if self.compile else []
        return ",".join(parts) or "default"

    @property
    def label(self) -> str:
        return self.attention if self.variant == "default" else f"{self.attention} {self.variant}"


def variants_from_config(variants_cfg: Any, attentions: list[str]) -> list[Variant]:
    """Expand ``{attention: [overrides, ...]}``; an attention without an entry runs its YAML as it is."""
    spec = (
        OmegaConf.to_container(variants_cfg, resolve=True)
        if isinstance(variants_cfg, DictConfig)
        else dict(variants_cfg or {})
    )
    unknown = sorted(set(spec) - set(registered_attentions()))
    if unknown:
        raise ConfigError(
            f"bench.variants names attentions {unknown} that have no conf/attention/<name>.yaml"
        )
    result = []
    for name in attentions:
        for entry in spec.get(name) or [{}]:
            entry = dict(entry or {})
            bench_keys = {key: bool(entry.pop(key, False)) for key in VARIANT_BENCH_KEYS}
            result.append(Variant(name, entry, **bench_keys))
    return result


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and threads: copied into every row."""
    env: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "git_commit": git_commit(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    env["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["sm_count"] = props.multi_processor_count
        env["memory_gb"] = round(props.total_memory / 2**30, 1)
    return env


def output_folder(output_dir: str | None, label: str) -> Path:
    """``<output_dir>/<label>``; without ``output_dir`` the Hydra run directory (``outputs/bench/<time>``), so
    that a scratch run never overwrites the committed ``results/efficiency/`` (it has to be named)."""
    if output_dir:
        return Path(output_dir) / label
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir) / label
    # Composed without a Hydra run (the compose API, tests): the same layout under ./outputs/bench.
    return Path("outputs") / "bench" / time.strftime("%Y-%m-%d_%H-%M-%S") / label


def default_label(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def is_oom(error: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a plain RuntimeError."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text


def release_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached device memory; ``collect`` also runs the garbage collector (slow: only after a failure,
    whose traceback frames may have held large tensors)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` (already warmed up).

    CUDA events on a GPU. On a CPU, ``time.perf_counter`` around each call: the calls take milliseconds to
    seconds, and ``torch.utils.benchmark.Timer.timeit`` would run two hidden warm-up calls per measurement.
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
            start_s = time.perf_counter()
            fn()
            times.append(1000.0 * (time.perf_counter() - start_s))
    return times


def median_iqr(times: list[float]) -> tuple[float, float]:
    if len(times) < 2:
        return times[0], 0.0
    quartiles = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), quartiles[2] - quartiles[0]


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak of the bytes allocated by ``fn`` above what was live when it started (inputs excluded).

    CUDA: the rise of ``max_memory_allocated``. CPU: the profiler's allocator accounting: every CPU tensor
    allocation and free is an event carrying the allocator's running total, and the peak is the largest
    total minus its value before the first event (live tensor bytes; not the process RSS, and not the
    private scratch of oneDNN/MKL).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
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


def _flop_factor(attention: str, factors: DictConfig) -> float:
    return float(factors.get(attention, factors.default))


def _gflops(flops: float | None, ms: float | None) -> float | None:
    return None if not flops or not ms else flops / (ms * 1e6)


def _relative_error(x: Tensor, reference: Tensor) -> float:
    reference = reference.double()
    return float((x.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def calibration_row(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Achieved matmul GFLOP/s (n³, the bench dtype) and device copy GB/s, measured in this run."""
    n, repeats = cfg.calibration.matmul_n, cfg.calibration.repeats
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    source = torch.empty(int(cfg.calibration.copy_mb * 2**20) // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    for fn in (lambda: a @ b, lambda: target.copy_(source)):
        fn()
    _sync(device)
    matmul_ms = median_iqr(time_calls(lambda: a @ b, device, repeats))[0]
    copy_ms = median_iqr(time_calls(lambda: target.copy_(source), device, repeats))[0]
    return {
        "kind": "calibration",
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_n": n,
        "matmul_gflops": 2 * n**3 / (matmul_ms * 1e6),
        "copy_mb": cfg.calibration.copy_mb,
        "copy_gb_s": 2 * source.numel() * 4 / (copy_ms * 1e6),
    }


@dataclass
class Shape:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool
    masked: bool

    def series_key(self) -> tuple:
        """Everything but N: the points of one line of a plot."""
        return self.batch, self.heads, self.head_dim, self.causal, self.masked


def operator_shapes(grid: DictConfig) -> Iterator[Shape]:
    for head_dim in grid.head_dim:
        for seq_len in sorted(grid.seq_len):
            for batch in grid.batch:
                for heads in grid.heads:
                    for causal in grid.causal:
                        for masked in grid.masked:
                            yield Shape(batch, heads, seq_len, head_dim, causal, masked)


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Fresh N(0, 1) q, k, v (leaves that require grad), dO, and the mask (the last N/8 tokens padded)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    size = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    q, k, v, dout = (torch.randn(size, generator=generator).to(device=device, dtype=dtype) for _ in range(4))
    mask = None
    if shape.masked:
        real = shape.seq_len - shape.seq_len // 8
        mask = (torch.arange(shape.seq_len) < real).expand(shape.batch, -1).to(device)
    return {
        "q": q.requires_grad_(),
        "k": k.requires_grad_(),
        "v": v.requires_grad_(),
        "dout": dout,
        "mask": mask,
    }


def build_operator(
    variant: Variant,
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    attn_dropout: float = 0.0,
) -> tuple[Attention, Callable]:
    """The module in eval mode (same seed for every variant, so random features and projections agree) and
    the callable to time (the module, or its ``torch.compile`` wrapper)."""
    torch.manual_seed(seed)
    module = attention_factory(variant.attention, variant.overrides, attn_dropout)(
        num_heads=shape.heads, head_dim=shape.head_dim, max_len=shape.seq_len, causal=shape.causal
    )
    module = module.to(device=device, dtype=dtype).eval()
    if not variant.compile:
        return module, module
    # A fresh compile per shape: cached graphs from other shapes would hit the recompile limit and
    # silently fall back to eager.
    torch._dynamo.reset()
    return module, torch.compile(module)


def _fwd_bwd(call: Callable, module: Attention, inputs: dict[str, Any]) -> Tensor:
    for name in "qkv":
        inputs[name].grad = None
    module.zero_grad(set_to_none=True)
    out = call(inputs["q"], inputs["k"], inputs["v"], inputs["mask"])
    out.backward(inputs["dout"])
    return out


def _fwd(call: Callable, inputs: dict[str, Any]) -> Tensor:
    with torch.no_grad():
        return call(inputs["q"], inputs["k"], inputs["v"], inputs["mask"])


class OperatorBench:
    """The operator level: every variant on every shape of the grid, interleaved per shape."""

    def __init__(
        self,
        cfg: DictConfig,
        variants: list[Variant],
        device: torch.device,
        dtype: torch.dtype,
        env: dict[str, Any],
        calibration: dict[str, Any] | None,
    ) -> None:
        self.cfg, self.grid = cfg, cfg.bench.operator_level
        self.variants, self.device, self.dtype, self.env = variants, device, dtype, env
        self.matmul_gflops = calibration["matmul_gflops"] if calibration else None
        self.time_cap = TimeCap(self.grid.point_budget_s)
        self.oom_at: dict[tuple, int] = {}
        self.gate_reference: dict[str, dict[str, Tensor] | None] = {}

    def rows(self) -> Iterator[dict[str, Any]]:
        for shape in operator_shapes(self.grid):
            inputs = make_inputs(shape, self.device, self.dtype, self.cfg.seed)
            sdpa_default = self._sdpa_default(inputs, shape)
            self.gate_reference = {}
            for variant in self.variants:
                started = time.perf_counter()
                row = self.base_row(variant, shape, sdpa_default)
                row.update(self.measure(variant, shape, inputs))
                row["load1"] = os.getloadavg()[0]
                row["wall_s"] = time.perf_counter() - started
                if row.get("fwd_bwd_ms") is not None:
                    self.time_cap.record((variant.label, *shape.series_key()), shape.seq_len, row["wall_s"])
                yield row
            del inputs
            release_memory(self.device)

    def base_row(self, variant: Variant, shape: Shape, sdpa_default: str) -> dict[str, Any]:
        return {
            "kind": "operator",
            **self.env,
            "attention": variant.attention,
            "variant": variant.variant,
            "label": variant.label,
            "overrides": variant.overrides,
            "compile": variant.compile,
            "quadratic": variant.quadratic,
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch": shape.batch,
            "heads": shape.heads,
            "seq_len": shape.seq_len,
            "head_dim": shape.head_dim,
            "causal": shape.causal,
            "masked": shape.masked,
            "sdpa_default": sdpa_default,
            "oom": False,
            "skipped": None,
            "error": None,
        }

    def _sdpa_default(self, inputs: dict[str, Any], shape: Shape) -> str:
        from models.attention.softmax import probe_dispatched_backend

        try:
            return probe_dispatched_backend(
                inputs["q"], inputs["k"], inputs["v"], inputs["mask"], shape.causal
            )
        except RuntimeError as error:
            return f"none ({str(error).splitlines()[0][:80]})"

    def skip_reason(self, variant: Variant, shape: Shape) -> tuple[str | None, bool]:
        """(why this point is not run, whether that counts as out of memory)."""
        key = (variant.label, *shape.series_key())
        if key in self.oom_at:
            return f"out of memory at N={self.oom_at[key]}", True
        if variant.quadratic and shape.seq_len > self.grid.max_n_quadratic:
            return f"materialises N×N: N > max_n_quadratic={self.grid.max_n_quadratic}", False
        if shape.causal and not get_class(_target(variant)).supports_causal:
            return "not causal", False
        return self.time_cap.skip_reason(key, shape.seq_len), False

    def measure(self, variant: Variant, shape: Shape, inputs: dict[str, Any]) -> dict[str, Any]:
        reason, oom = self.skip_reason(variant, shape)
        if reason is not None:
            return {"skipped": reason, "oom": oom}
        module = call = None
        failed = False
        try:
            module, call = build_operator(
                variant, shape, self.device, self.dtype, self.cfg.seed, self.cfg.model.attn_dropout
            )
            return self._measure(variant, shape, inputs, module, call)
        except Exception as error:  # noqa: BLE001 - every failure becomes a row, the sweep goes on
            failed = True
            if is_oom(error):
                self.oom_at[(variant.label, *shape.series_key())] = shape.seq_len
                return {"oom": True, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        finally:
            del module, call
            for name in "qkv":
                inputs[name].grad = None
            release_memory(self.device, collect=failed)

    def _measure(
        self, variant: Variant, shape: Shape, inputs: dict[str, Any], module: Attention, call: Callable
    ) -> dict[str, Any]:
        grid, device = self.grid, self.device
        for _ in range(max(1, grid.warmup)):
            out = _fwd_bwd(call, module, inputs)
        _sync(device)
        gate = self._gate(variant, shape, out, inputs)
        del out
        peak_mb = peak_memory_mb(lambda: _fwd_bwd(call, module, inputs), device)
        fwd_bwd = time_calls(lambda: _fwd_bwd(call, module, inputs), device, grid.repeats)
        for _ in range(max(1, grid.warmup)):
            _fwd(call, inputs)
        _sync(device)
        fwd = time_calls(lambda: _fwd(call, inputs), device, grid.repeats)
        (fwd_ms, fwd_iqr), (fb_ms, fb_iqr) = median_iqr(fwd), median_iqr(fwd_bwd)
        flops = float(module.flops(shape.batch, shape.heads, shape.seq_len, shape.head_dim))
        fb_flops = flops * _flop_factor(variant.attention, self.cfg.fwd_bwd_flop_factor)
        softmax_flops = 4.0 * shape.batch * shape.heads * shape.seq_len**2 * shape.head_dim
        values = {
            key: (value.item() if isinstance(value, Tensor) else value)
            for key, value in module.log_values().items()
            if not key.startswith("tau_")
        }
        row = {
            "fwd_ms": fwd_ms,
            "fwd_ms_iqr": fwd_iqr,
            "fwd_bwd_ms": fb_ms,
            "fwd_bwd_ms_iqr": fb_iqr,
            "repeats": grid.repeats,
            "peak_mb": peak_mb,
            "flops": flops,
            "fwd_bwd_flops": fb_flops,
            "fwd_gflops": _gflops(flops, fwd_ms),
            "fwd_bwd_gflops": _gflops(fb_flops, fb_ms),
            "softmax_equiv_fwd_gflops": _gflops(softmax_flops, fwd_ms),
            "softmax_equiv_fwd_bwd_gflops": _gflops(3.5 * softmax_flops, fb_ms),
            "values": values,
            "backend": values.get("backend"),
            "backend_dispatched": values.get("backend_dispatched"),
            "mode_used": values.get("mode_used"),
            "impl_used": values.get("impl_used"),
            **gate,
        }
        if self.matmul_gflops:
            row["fwd_pct_of_matmul"] = 100 * row["fwd_gflops"] / self.matmul_gflops
        return row

    def _gate(self, variant: Variant, shape: Shape, out: Tensor, inputs: dict[str, Any]) -> dict[str, Any]:
        """Output and q/k/v gradients against the attention's first variant run in fp32 (spec 7.1.3)."""
        if shape.seq_len > self.grid.gate_max_n:
            return {"gate_err": None, "gate_ok": None}
        reference = self._gate_reference(variant, shape, inputs)
        if reference is None:
            return {"gate_err": None, "gate_ok": None}
        ours = {"out": out.detach(), **{name: inputs[name].grad for name in "qkv"}}
        err = max(_relative_error(ours[name], reference[name]) for name in reference)
        tolerance = float(self.grid.gate_tol[str(self.dtype).removeprefix("torch.")])
        return {"gate_err": err, "gate_ok": err <= tolerance, "gate_against": self._first(variant).variant}

    def _first(self, variant: Variant) -> Variant:
        return next(v for v in self.variants if v.attention == variant.attention)

    def _gate_reference(self, variant: Variant, shape: Shape, inputs: dict[str, Any]) -> dict | None:
        if variant.attention in self.gate_reference:
            return self.gate_reference[variant.attention]
        first = replace(self._first(variant), compile=False)
        reference = None
        try:
            module, call = build_operator(first, shape, self.device, torch.float32, self.cfg.seed)
            leaves = {name: inputs[name].detach().float().requires_grad_() for name in "qkv"}
            fp32 = {**leaves, "dout": inputs["dout"].float(), "mask": inputs["mask"]}
            out = _fwd_bwd(call, module, fp32)
            reference = {"out": out.detach(), **{name: leaves[name].grad for name in "qkv"}}
        except Exception:  # noqa: BLE001 - no reference (e.g. a pinned backend without fp32): no gate
            reference = None
        self.gate_reference[variant.attention] = reference
        return reference


def _target(variant: Variant) -> str:
    return str(OmegaConf.load(ATTENTION_DIR / f"{variant.attention}.yaml")["_target_"])


class ModelBench:
    """The model level: one LRA model per attention variant, training steps/s and peak memory."""

    def __init__(
        self, cfg: DictConfig, variants: list[Variant], device: torch.device, env: dict[str, Any]
    ) -> None:
        self.cfg, self.level = cfg, cfg.bench.model_level
        self.variants, self.device, self.env = variants, device, env
        self.time_cap = TimeCap(self.level.point_budget_s)
        self.oom_at: dict[str, int] = {}
        self._task_cfg: DictConfig | None = None

    def compose_task(self, variant: Variant, seq_len: int) -> DictConfig:
        """conf/config.yaml for the task as train.py would see it, with this attention variant, length and
        batch size (composed once; the attention node is swapped like the ``attention=<name>`` override)."""
        if self._task_cfg is None:
            from hydra import compose

            overrides = [
                f"task={self.level.task}",
                f"profile={self.level.profile}",
                f"data.batch_size={self.level.batch_size}",
                *self.level.overrides,
            ]
            self._task_cfg = compose(config_name="config", overrides=overrides)
        cfg = self._task_cfg.copy()
        cfg.data.seq_len = seq_len
        cfg.attention = OmegaConf.merge(
            OmegaConf.load(ATTENTION_DIR / f"{variant.attention}.yaml"), variant.overrides
        )
        return cfg

    def rows(self) -> Iterator[dict[str, Any]]:
        for seq_len in sorted(self.level.seq_len):
            for variant in self.variants:
                started = time.perf_counter()
                row = {
                    "kind": "model",
                    **self.env,
                    "task": self.level.task,
                    "profile": self.level.profile,
                    "attention": variant.attention,
                    "variant": variant.variant,
                    "label": variant.label,
                    "overrides": variant.overrides,
                    "compile": variant.compile,
                    "seq_len": seq_len,
                    "batch": self.level.batch_size,
                    "precision": str(self.level.precision),
                    "oom": False,
                    "skipped": None,
                    "error": None,
                }
                row.update(self.measure(variant, seq_len))
                row["load1"] = os.getloadavg()[0]
                row["wall_s"] = time.perf_counter() - started
                if row.get("step_ms") is not None:
                    self.time_cap.record((variant.label,), seq_len, row["wall_s"])
                yield row

    def measure(self, variant: Variant, seq_len: int) -> dict[str, Any]:
        if variant.label in self.oom_at:
            return {"skipped": f"out of memory at N={self.oom_at[variant.label]}", "oom": True}
        reason = self.time_cap.skip_reason((variant.label,), seq_len)
        if reason is not None:
            return {"skipped": reason}
        failed = False
        try:
            return self._measure(variant, seq_len)
        except Exception as error:  # noqa: BLE001 - every failure becomes a row, the sweep goes on
            failed = True
            if is_oom(error):
                self.oom_at[variant.label] = seq_len
                return {"oom": True, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        finally:
            release_memory(self.device, collect=failed)

    def _measure(self, variant: Variant, seq_len: int) -> dict[str, Any]:
        from lra.build import build_model

        cfg = self.compose_task(variant, seq_len)
        data_class = get_class(cfg.data._target_)
        if data_class.dual:
            raise ConfigError(f"the model level times single-document tasks; {self.level.task} is dual")
        datamodule = _DataShape(data_class.vocab_size, data_class.num_classes, False, seq_len)
        torch.manual_seed(self.cfg.seed)
        model = build_model(cfg.model, instantiate(cfg.attention), datamodule).to(self.device).train()
        if variant.compile:
            torch._dynamo.reset()
            model = torch.compile(model)
        optimizer = instantiate(cfg.optim)(model.parameters())
        generator = torch.Generator().manual_seed(self.cfg.seed)
        batch = self.level.batch_size
        ids = torch.randint(1, data_class.vocab_size, (batch, seq_len), generator=generator).to(self.device)
        labels = torch.randint(0, data_class.num_classes, (batch,), generator=generator).to(self.device)
        autocast = str(self.level.precision) == "bf16-mixed"

        def step() -> None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(model(ids).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(max(1, self.level.warmup)):
            step()
        _sync(self.device)
        peak_mb = peak_memory_mb(step, self.device)
        step_ms, step_iqr = median_iqr(time_calls(step, self.device, self.level.repeats))
        encoder = model.encoder if hasattr(model, "encoder") else model._orig_mod.encoder
        values = {
            key: value
            for key, value in encoder.attentions[0].log_values().items()
            if not key.startswith("tau_")
        }
        return {
            "step_ms": step_ms,
            "step_ms_iqr": step_iqr,
            "steps_per_s": 1000.0 / step_ms,
            "repeats": self.level.repeats,
            "peak_mb": peak_mb,
            "n_layers": cfg.model.n_layers,
            "d_model": cfg.model.d_model,
            "heads": cfg.model.num_heads,
            "head_dim": cfg.model.qkv_dim // cfg.model.num_heads,
            "mlp_dim": cfg.model.mlp_dim,
            "tokens": seq_len + int(cfg.model.pooling == "cls"),
            "parameters": sum(p.numel() for p in model.parameters()),
            "values": to_jsonable(values),
            "mode_used": values.get("mode_used"),
            "impl_used": values.get("impl_used"),
            "backend_dispatched": values.get("backend_dispatched"),
        }


@dataclass
class _DataShape:
    """What build_model reads from a data module, without loading any data."""

    vocab_size: int
    num_classes: int
    dual: bool
    seq_len: int


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device=cuda, but no CUDA device is available; use bench=default (CPU)")
    return torch.device(name)


def run(cfg: DictConfig) -> Path:
    """Run the preset in ``cfg.bench``; write rows.jsonl, report.md and the plots; return their folder."""
    bench = cfg.bench
    device = select_device(bench.device)
    if bench.dtype not in DTYPES:
        raise ConfigError(f"bench.dtype={bench.dtype!r} is not one of {sorted(DTYPES)}")
    dtype = DTYPES[bench.dtype]
    threads = torch.get_num_threads()
    if bench.get("threads"):
        torch.set_num_threads(int(bench.threads))
    try:
        return _run(cfg, device, dtype)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> Path:
    from lra.bench_report import write_report

    bench = cfg.bench
    label = cfg.label or default_label(device)
    out_dir = output_folder(cfg.get("output_dir"), label)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    variants = variants_from_config(bench.variants, registered_attentions(bench.get("attentions")))
    levels = list(bench.levels)
    unknown = sorted(set(levels) - {"operator", "model"})
    if unknown:
        raise ConfigError(f"bench.levels has {unknown}; the levels are 'operator' and 'model'")

    path = out_dir / "rows.jsonl"
    started = time.time()
    with path.open("w") as sink:

        def emit(row: dict[str, Any]) -> None:
            sink.write(json.dumps(to_jsonable(row), sort_keys=True) + "\n")
            sink.flush()
            _print_row(row)

        run_row = {
            "kind": "run",
            **env,
            "label": label,
            "preset": bench.name,
            "levels": levels,
            "dtype": bench.dtype,
            "load_avg_start": list(os.getloadavg()),
            "notes": list(cfg.notes),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "config": OmegaConf.to_container(bench, resolve=True),
            "references": list(bench.references),
            "fwd_bwd_flop_factor": OmegaConf.to_container(cfg.fwd_bwd_flop_factor),
        }
        emit(run_row)
        calibration = None
        if bench.get("calibration"):
            calibration = {**calibration_row(bench, device, dtype), **env}
            emit(calibration)
        if "operator" in levels:
            for row in OperatorBench(cfg, variants, device, dtype, env, calibration).rows():
                emit(row)
        if "model" in levels:
            level = bench.model_level
            model_variants = (
                variants
                if level.get("variants") is None
                else variants_from_config(level.variants, registered_attentions(bench.get("attentions")))
            )
            for row in ModelBench(cfg, model_variants, device, env).rows():
                emit(row)
        emit({"kind": "run_end", "load_avg_end": list(os.getloadavg()), "wall_s": time.time() - started})
    write_report(path, out_dir)
    if "wandb" in (cfg.get("logger") or {}):
        log_to_wandb(cfg, path, out_dir, label)
    print(f"\nBenchmark rows, report and plots: {out_dir}")
    return out_dir


def _print_row(row: dict[str, Any]) -> None:
    if row["kind"] not in ("operator", "model"):
        return
    where = (
        f"N={row['seq_len']:>6} d={row.get('head_dim')}"
        if row["kind"] == "operator"
        else f"model N={row['seq_len']:>5}"
    )
    if row.get("skipped") or row.get("error"):
        result = "OOM" if row.get("oom") else ""
        result = f"{result} {row.get('skipped') or row.get('error')}".strip()
    elif row["kind"] == "operator":
        result = (
            f"fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  peak {row['peak_mb']:8.1f} MB"
        )
    else:
        result = (
            f"step {row['step_ms']:9.1f} ms  {row['steps_per_s']:6.2f} steps/s  peak {row['peak_mb']:8.1f} MB"
        )
    print(f"{where}  {row['label']:<36} {result}", flush=True)


def log_to_wandb(cfg: DictConfig, path: Path, out_dir: Path, label: str) -> None:
    """The rows as W&B tables (one per level) and the plots as images; offline unless WANDB_MODE is set."""
    os.environ.setdefault("WANDB_MODE", "offline")
    import wandb

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    settings = cfg.logger.wandb
    run = wandb.init(
        project=settings.get("project", "lra"),
        entity=settings.get("entity"),
        job_type="bench",
        name=f"bench-{label}-{cfg.bench.name}",
        tags=["bench", f"device={label}"],
        config=OmegaConf.to_container(cfg.bench, resolve=True),
    )
    try:
        for kind in ("operator", "model", "calibration"):
            selected = [row for row in rows if row["kind"] == kind]
            if not selected:
                continue
            columns = sorted({key for row in selected for key in row})
            data = [[_wandb_cell(row.get(column)) for column in columns] for row in selected]
            run.log({f"bench/{kind}": wandb.Table(columns=columns, data=data)})
        images = {f"bench/{png.stem}": wandb.Image(str(png)) for png in sorted(out_dir.glob("*.png"))}
        run.log(images)
    finally:
        run.finish()


def _wandb_cell(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg.bench, resolve=True))
    run(cfg)


if __name__ == "__main__":
    # A ConfigError (a lra.errors.UserError) is reported by Hydra as its message alone; HYDRA_FULL_ERROR=1
    # shows the traceback.
    main()
