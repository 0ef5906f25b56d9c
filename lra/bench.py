"""Efficiency benchmark: every registered attention, time and memory against sequence length.

    python -m lra.bench                           # CPU grid (conf/bench/default.yaml) into outputs/bench/
    python -m lra.bench bench=gpu                 # GPU grid (bf16, up to 64k, SDPA backends pinned)
    python -m lra.bench bench=smoke output_dir=/tmp/bench
    python -m lra.bench output_dir=results/efficiency   # regenerate the committed CPU benchmark
    python -m lra.bench logger=wandb              # also log the rows as a W&B table (offline by default)

Two levels (``lra/bench_levels.py``), both interleaved so that every method sees the same inputs in the same
process: the operator level times the attention module alone against N, the model level one training step
of a whole LRA model, laid out like the LRA paper's speed/memory table (Tay et al. 2021, arXiv 2011.04006,
Table 2).

The attentions come from ``conf/attention/*.yaml`` (the registry); a preset lists per-attention variants
(constructor overrides such as TaylorShift modes or SDPA backends). Every outcome is a row of
``<output_dir>/<label>/rows.jsonl`` (``output_dir`` defaults to the Hydra run directory, never to the
committed ``results/``): measured, out of memory, skipped (and why) or failed; then
``lra/bench_report.py`` writes ``report.md`` and the plots from that file alone.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lra.bench_levels import ModelBench, OperatorBench, variants_from_config
from lra.bench_rows import device_label
from lra.errors import ConfigError
from lra.registry import registered_attentions
from lra.summary import REPO_ROOT, device_name, git_commit, to_jsonable
from lra.timing import median_ms, warm_up

DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float64")}


BENCH_CONFIG = REPO_ROOT / "conf" / "bench.yaml"


def shared_bench_config() -> DictConfig:
    """conf/bench.yaml's own keys (seed, FLOP conventions), without its Hydra defaults: the root that scripts
    building an ``OperatorBench`` / ``ModelBench`` outside a Hydra run merge their ``bench`` node into."""
    shared = OmegaConf.load(BENCH_CONFIG)
    for key in ("defaults", "hydra"):
        shared.pop(key)
    return shared


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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return device_label(device.type, name)


def calibration_row(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Achieved matmul GFLOP/s (n³, the bench dtype) and device copy GB/s, measured in this run."""
    n, repeats = cfg.calibration.matmul_n, cfg.calibration.repeats
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    source = torch.empty(int(cfg.calibration.copy_mb * 2**20) // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    for fn in (lambda: a @ b, lambda: target.copy_(source)):
        warm_up(fn, device, 1)
    matmul_ms = median_ms(lambda: a @ b, device, repeats)[0]
    copy_ms = median_ms(lambda: target.copy_(source), device, repeats)[0]
    return {
        "kind": "calibration",
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_n": n,
        "matmul_gflops": 2 * n**3 / (matmul_ms * 1e6),
        "copy_mb": cfg.calibration.copy_mb,
        "copy_gb_s": 2 * source.numel() * 4 / (copy_ms * 1e6),
    }


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
