"""Every GPU-only path of the harness in one prepared command of about 8 minutes (README, "GPU check").

    make gpu-check [DRY_RUN=1]      # python -m lra.gpu_check [--dry-run] [--stages pytest,train] [--out DIR]

Stages pytest, operator, model and train, each with a time budget: unused time passes to the next stage,
and a stage out of time keeps its rows and says so. Sizes, budgets and variants are in conf/gpu_check/
(gpu.yaml; dry_run.yaml holds the dry run's differences). The operator and model stages run in child processes
killed GRACE_S past their deadline, so a hung kernel costs one stage, not the check. Where hydra, omegaconf,
antlr4 or wandb cannot be imported (the bare GPU image), the wheels carried in ``.whl/`` (fetched with
``bash ../shared/tools/device-wheels.sh``) are installed and the check restarts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

# Standard library only (and these modules): importable before ensure_imports has installed the wheels.
from lra.bench_rows import Rows, load_rows
from lra.gpu_check_stages import REPO, run_bounded, stage_pytest, train_and_resume

REQUIRED = ("hydra", "omegaconf", "antlr4", "lightning", "torch")
# Seconds a child stage may run past its deadline (a point already started, e.g. a torch.compile) before
# it is killed; the overrun is taken from the later stages.
GRACE_S = 40.0


def load_preset(dry: bool) -> dict[str, Any]:
    """conf/gpu_check/gpu.yaml, with dry_run.yaml merged over it for the dry run (after ensure_imports)."""
    from omegaconf import OmegaConf

    names = ["gpu.yaml", "dry_run.yaml"] if dry else ["gpu.yaml"]
    return OmegaConf.to_container(
        OmegaConf.merge(*(OmegaConf.load(REPO / "conf" / "gpu_check" / n) for n in names))
    )


def ensure_imports(wheels: Path, argv: list[str]) -> None:
    """Install the wheels in ``wheels`` and restart when a package the check needs cannot be imported."""
    import importlib.util

    found = sorted(wheels.glob("*.whl"))
    installed = bool(os.environ.get("LRA_GPU_CHECK_INSTALLED"))
    missing = [name for name in (*REQUIRED, "wandb") if importlib.util.find_spec(name) is None]
    # W&B is optional (the training stage falls back to the CSV logger), but installed when carried.
    if not missing or (missing == ["wandb"] and (installed or not found)):
        return
    if installed:
        sys.exit(f"gpu_check: {missing} still missing after installing {wheels}: run a python that has torch")
    if not found:
        sys.exit(
            f"gpu_check: cannot import {missing}. Fetch the wheels where pip has network access: "
            f"`bash ../shared/tools/device-wheels.sh` (writes .whl/), carry .whl, and rerun."
        )
    site = wheels / "site"
    print(
        f"gpu_check: {missing} missing; installing {len(found)} wheels from {wheels} into {site}", flush=True
    )
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target", str(site)]
    subprocess.run([*pip, *map(str, found)], check=True)
    path = os.pathsep.join(filter(None, [str(site.resolve()), os.environ.get("PYTHONPATH")]))
    os.environ.update(PYTHONPATH=path, LRA_GPU_CHECK_INSTALLED="1")
    os.execv(sys.executable, [sys.executable, "-m", "lra.gpu_check", *argv])


def _drain(rows: Iterable[dict[str, Any]], sink: Rows, deadline: float, stage: str, extra: Callable) -> bool:
    """Emit rows until the iterator ends (True) or the deadline passes (a ``cut`` row, False)."""
    for row in rows:
        row = extra(row)
        sink.emit(row)
        if time.time() > deadline:
            after = f"{row.get('label')} N={row.get('seq_len')}"
            sink.emit({"kind": "cut", "stage": stage, "after": after})
            print(f"gpu_check: {stage} stage out of time after {after}")
            return False
    return True


def _bench_cfg(preset: dict[str, Any], **level: Any) -> Any:
    """The config that lra.bench's OperatorBench / ModelBench read, with this preset as its ``bench``."""
    from omegaconf import OmegaConf

    from lra.bench import shared_bench_config

    bench = {key: preset[key] for key in ("name", "device", "dtype", "calibration", "operator_level")}
    bench |= {"references": preset["references"], "model_level": level or preset["model_level"]}
    return OmegaConf.merge(shared_bench_config(), {"bench": bench})


def _tokens(row: dict[str, Any]) -> dict[str, Any]:
    """Padded tokens the model processes per second, as train.py's ThroughputMonitor counts them."""
    if row.get("steps_per_s"):
        row["tokens_per_s"] = row["steps_per_s"] * row["batch"] * row["seq_len"]
    return row


def child_main(stage: str, preset: dict[str, Any], rows: Path, deadline: float) -> None:
    """The operator or model stage in its own process (``--stage``): the parent kills it at its deadline
    plus GRACE_S. The operator stage's torch.compile rows run last (a short budget loses those first)."""
    import torch
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from lra import bench

    if preset["device"] == "cpu":
        torch.set_num_threads(1)
    if preset["compile_backend"]:
        import functools

        # Only the dry run: Dynamo traces as on the GPU, without Inductor's minutes-long C++ build.
        torch.compile = functools.partial(torch.compile, backend=preset["compile_backend"])
    sink, device = Rows(rows), torch.device(preset["device"])
    env = bench.environment(device)

    def operator_rows() -> Iterator[dict[str, Any]]:
        cfg, dtype = _bench_cfg(preset), bench.DTYPES[preset["dtype"]]
        calibration = {**bench.calibration_row(cfg.bench, device, dtype), **env}
        sink.emit(calibration)
        variants = bench.variants_from_config(preset["variants"], bench.registered_attentions())
        yield from bench.OperatorBench(cfg, variants, device, dtype, env, calibration).rows()
        compiled = bench.variants_from_config(preset["compile_variants"], list(preset["compile_variants"]))
        for seq_len in preset["compile_seq_len"]:  # torch.compile compiles once per shape
            cfg.bench.operator_level.seq_len = [seq_len]
            yield from bench.OperatorBench(cfg, compiled, device, dtype, env, calibration).rows()

    def model_rows() -> Iterator[dict[str, Any]]:
        level = preset["model_level"]
        variants = bench.variants_from_config(level["variants"], bench.registered_attentions())
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            for task, sizes in level["tasks"].items():
                official = OmegaConf.load(REPO / "conf" / "task" / f"{task}.yaml").data
                task_level = {key: value for key, value in level.items() if key != "tasks"}
                task_level |= {
                    "task": task,
                    "seq_len": [int(sizes.get("seq_len") or official.seq_len)],
                    "batch_size": int(sizes.get("batch_size") or official.batch_size),
                    "reference": "softmax",
                }
                yield from bench.ModelBench(_bench_cfg(preset, **task_level), variants, device, env).rows()

    _drain(operator_rows() if stage == "operator" else model_rows(), sink, deadline, stage, _tokens)


def stage_child(name: str, dry: bool, sink: Rows, deadline: float) -> str:
    cmd = [sys.executable, "-m", "lra.gpu_check", "--stage", name, "--rows", str(sink.path)]
    cmd += ["--deadline", str(deadline)] + (["--dry-run"] if dry else [])
    env = dict(os.environ)
    if dry:
        env.setdefault("TRITON_INTERPRET", "1")  # the Triton variants run in the interpreter on a CPU
    code = run_bounded(cmd, deadline - time.time() + GRACE_S, env=env)
    if code is None:
        return f"killed {GRACE_S:.0f} s past its deadline"
    return "ok" if code == 0 else f"failed (exit {code})"


STAGES = ("pytest", "operator", "model", "train")


def folders(dry: bool, label: str, out: str | None, scratch: str | None) -> tuple[Path, Path]:
    """(report folder, scratch folder). A dry run never writes into the committed ``results/``."""
    where = REPO / "outputs" / "gpu-check-dry" if dry else REPO / "results" / "gpu"
    scratch_default = REPO / "outputs" / ("gpu-check-dry" if dry else "gpu-check")
    return Path(out) if out else where / label, Path(scratch) if scratch else scratch_default


def run_check(args: argparse.Namespace, preset: dict[str, Any]) -> int:
    import torch

    from lra import bench
    from lra.gpu_check_report import OUTPUT_FILES, write_report

    device = torch.device(preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; `python -m lra.gpu_check --dry-run` runs the CPU dry run")
    chosen = args.stages.split(",") if args.stages else list(STAGES)
    if set(chosen) - set(STAGES):
        sys.exit(f"gpu_check: --stages {args.stages!r}: choose from {','.join(STAGES)}")
    stages = [s for s in STAGES if s in chosen]
    label = "dry-run-cpu" if args.dry_run else bench.default_label(device)
    out, scratch = folders(args.dry_run, label, args.out, args.scratch)
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # files of an earlier check, never anything else
        (out / name).unlink(missing_ok=True)
    sink, started = Rows(out / "rows.jsonl"), time.time()
    budgets = {s: preset["budgets_s"][s] * args.budget_scale for s in stages}
    sink.emit(
        {
            "kind": "run",
            **bench.environment(device),
            "label": label,
            "preset": preset["name"],
            "dry_run": args.dry_run,
            "dtype": preset["dtype"],
            "stages": stages,
            "budgets_s": budgets,
            "load_avg_start": list(os.getloadavg()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "config": {key: preset[key] for key in ("operator_level", "model_level", "train", "variants")},
            "references": preset["references"],
            "notes": [],
        }
    )
    carry, failed = 0.0, False
    for name in stages:
        # An overrun shortens the later stages, never below half their budget.
        budget = max(budgets[name] / 2, budgets[name] + carry)
        stage_start = time.time()
        deadline = stage_start + budget
        print(f"\n== gpu_check: stage {name} (budget {budget:.0f} s)", flush=True)
        try:
            if name == "pytest":
                status = stage_pytest(sink, deadline, out, scratch)
            elif name == "train":
                log = out / "train.log"
                status = train_and_resume(preset["train"], args.dry_run, sink.emit, deadline, log, scratch)
            else:
                status = stage_child(name, args.dry_run, sink, deadline)
        except Exception as error:  # noqa: BLE001 - a broken stage is a row; the later stages still run
            status = f"failed: {type(error).__name__}: {error}"
        wall = time.time() - stage_start
        cut = any(r.get("kind") == "cut" and r.get("stage") == name for r in load_rows(sink.path))
        sink.emit(
            {"kind": "stage", "stage": name, "status": status, "budget_s": budget, "wall_s": wall, "cut": cut}
        )
        print(
            f"== gpu_check: stage {name}: {status} in {wall:.0f} s" + (" (out of time)" if cut else ""),
            flush=True,
        )
        failed |= status != "ok"
        carry = deadline - time.time()
    sink.emit({"kind": "run_end", "load_avg_end": list(os.getloadavg()), "wall_s": time.time() - started})
    report = write_report(sink.path)
    print(f"\ngpu_check: {time.time() - started:.0f} s; report {report}", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m lra.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script itself")
    parser.add_argument(
        "--out", help="report folder (default results/gpu/<device>; dry run: outputs/gpu-check-dry)"
    )
    parser.add_argument("--scratch", help="training runs, data, JUnit XML (default outputs/gpu-check[-dry])")
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage's time budget")
    parser.add_argument("--wheels", default=str(REPO / ".whl"), help="wheels to install when imports fail")
    parser.add_argument("--stage", choices=["operator", "model"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ensure_imports(Path(args.wheels), argv)
    preset = load_preset(args.dry_run)
    if args.stage:
        child_main(args.stage, preset, Path(args.rows), args.deadline)
        return 0
    return run_check(args, preset)


if __name__ == "__main__":
    sys.exit(main())
