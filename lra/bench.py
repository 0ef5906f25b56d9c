"""Efficiency benchmark: every registered attention, time and memory against sequence length (README,
"Efficiency benchmark"). ``python -m lra.bench [bench=default|gpu|smoke] [output_dir=...] [logger=wandb]``.

The operator and model levels (``lra/bench_levels.py``) write one row per outcome (measured, out of memory,
skipped, failed) to ``<output_dir>/<label>/rows.jsonl``; ``lra/bench_report.py`` turns that file alone into
``report.md`` and the plots.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lra.bench_levels import ModelBench, OperatorBench, variants_from_config
from lra.bench_rows import Rows, device_label, load_rows
from lra.errors import ConfigError
from lra.registry import registered_attentions
from lra.summary import REPO_ROOT, device_name, git_commit, versions
from lra.timing import measure

DTYPES = {name: getattr(torch, name) for name in ("float32", "bfloat16", "float16", "float64")}


def shared_bench_config() -> DictConfig:
    """conf/bench.yaml's own keys (seed, FLOP conventions) without its defaults: the root into which scripts
    that build an ``OperatorBench`` / ``ModelBench`` outside a Hydra run merge their ``bench`` node."""
    shared = OmegaConf.load(REPO_ROOT / "conf" / "bench.yaml")
    for key in ("defaults", "hydra"):
        shared.pop(key)
    return shared


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and threads: copied into every row."""
    env: dict[str, Any] = {
        "device": device.type,
        "device_name": device_name(),
        "git_commit": git_commit(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cudnn": "none",
        **versions(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"device_name": props.name, "sm_count": props.multi_processor_count}
        env["memory_gb"] = round(props.total_memory / 2**30, 1)
    return env


def default_label(device: torch.device) -> str:
    return device_label(device.type, torch.cuda.get_device_name(device) if device.type == "cuda" else "")


def calibration_row(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Achieved matmul GFLOP/s (n³, the bench dtype) and device copy GB/s, measured in this run."""
    n, repeats = cfg.calibration.matmul_n, cfg.calibration.repeats
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    source = torch.empty(int(cfg.calibration.copy_mb * 2**20) // 4, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    matmul_ms = measure(lambda: a @ b, device, 1, repeats, memory=False)[2]
    copy_ms = measure(lambda: target.copy_(source), device, 1, repeats, memory=False)[2]
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
    from lra.bench_report import write_report

    bench = cfg.bench
    device = select_device(bench.device)
    if bench.dtype not in DTYPES:
        raise ConfigError(f"bench.dtype={bench.dtype!r} is not one of {sorted(DTYPES)}")
    levels = list(bench.levels)
    if unknown := sorted(set(levels) - {"operator", "model"}):
        raise ConfigError(f"bench.levels has {unknown}; the levels are 'operator' and 'model'")
    dtype, threads = DTYPES[bench.dtype], torch.get_num_threads()
    attentions = registered_attentions(bench.get("attentions"))
    variants = model_variants = variants_from_config(bench.variants, attentions)
    if "model" in levels and bench.model_level.get("variants") is not None:
        model_variants = variants_from_config(bench.model_level.variants, attentions)
    label = cfg.label or default_label(device)
    # Without output_dir: the Hydra run directory (outputs/bench/<time>), never the committed results/.
    if cfg.get("output_dir"):
        out_dir = Path(cfg.output_dir) / label
    elif HydraConfig.initialized():
        out_dir = Path(HydraConfig.get().runtime.output_dir) / label
    else:  # composed without a Hydra run (the compose API, tests)
        out_dir = Path("outputs") / "bench" / time.strftime("%Y-%m-%d_%H-%M-%S") / label
    out_dir.mkdir(parents=True, exist_ok=True)
    path, started = out_dir / "rows.jsonl", time.time()
    if bench.get("threads"):
        torch.set_num_threads(int(bench.threads))
    emit = Rows(path).emit
    try:
        path.write_text("")
        env = environment(device)
        emit(
            {
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
        )
        calibration = None
        if bench.get("calibration"):
            calibration = {**calibration_row(bench, device, dtype), **env}
            emit(calibration)
        if "operator" in levels:
            for row in OperatorBench(cfg, variants, device, dtype, env, calibration).rows():
                emit(row)
        if "model" in levels:
            for row in ModelBench(cfg, model_variants, device, env).rows():
                emit(row)
        emit({"kind": "run_end", "load_avg_end": list(os.getloadavg()), "wall_s": time.time() - started})
    finally:
        torch.set_num_threads(threads)
    write_report(path)
    if "wandb" in (cfg.get("logger") or {}):
        log_to_wandb(cfg, path, out_dir, label)
    print(f"\nBenchmark rows, report and plots: {out_dir}")
    return out_dir


def log_to_wandb(cfg: DictConfig, path: Path, out_dir: Path, label: str) -> None:
    """The rows as W&B tables (one per level) and the plots as images; offline unless WANDB_MODE is set."""
    os.environ.setdefault("WANDB_MODE", "offline")
    import wandb

    rows = load_rows(path)
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
            if selected:
                columns = sorted({key for row in selected for key in row})
                data = [
                    [
                        json.dumps(v, sort_keys=True) if isinstance(v := row.get(c), dict | list) else v
                        for c in columns
                    ]
                    for row in selected
                ]
                run.log({f"bench/{kind}": wandb.Table(columns=columns, data=data)})
        run.log({f"bench/{png.stem}": wandb.Image(str(png)) for png in sorted(out_dir.glob("*.png"))})
    finally:
        run.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    print(OmegaConf.to_yaml(cfg.bench, resolve=True))
    run(cfg)


if __name__ == "__main__":
    main()  # a ConfigError prints as its message alone; HYDRA_FULL_ERROR=1 shows the traceback
