"""Gradient norms of every registered attention, to check TaylorShift's and Fastmax's bounded-gradient claim
(Nauen et al. 2024, arXiv 2403.02920; Gerami et al. 2024, arXiv 2402.07901).

    python -m lra.analysis.gradients                       # a short CPU ListOps run per attention, report
    python -m lra.analysis.gradients --skip-train          # report from the runs already in --runs-dir
    python -m lra.analysis.gradients --smoke --out /tmp/g  # the operator sweep only, tiny shapes (seconds)

* Operator (``gradients_vs_scale.png``): the gradient norms of <out, dO> (fixed random dO) for one call on
  (s·q, s·k, v). Normalised logits (TaylorShift's cosine, Fastmax's max-norm) make the output invariant to
  s, so their q, k gradients must fall as 1/s; softmax's grow, then vanish as it saturates.
* Training (``gradients_listops.png``): ``--steps`` CPU ListOps steps per attention with
  ``callbacks=analyses``, logging the per-layer norms of dL/dq, dL/dk, dL/dv every ``--every`` steps; the
  runs stay in ``--runs-dir``. Reports go to ``--out`` (default ``outputs/analyses``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from data.cache import atomic_write_text
from lra.analysis.runs import (
    analysis_parser,
    grad_series,
    launch,
    read_metrics,
    read_summary,
    save_figure,
    shown,
)
from lra.errors import run_cli
from lra.markdown import md_table
from lra.registry import attention_factory, registered_attentions
from lra.summary import REPO_ROOT, device_name

# The operator sweep runs TaylorShift in its efficient mode, the O(N) path the claim is about.
OPERATOR_OVERRIDES = {"taylorshift": {"mode": "efficient"}}
# On top of every registered attention: the two normalised kernels with their normalisation switched off.
UNNORMALISED = (
    ("taylorshift normalize_input=false", "taylorshift", {"mode": "efficient", "normalize_input": False}),
    ("fastmax normalize=none", "fastmax", {"normalize": "none"}),
)
SCALES = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
# Modules are built for at least this length so that every YAML's defaults fit (Linformer's proj_len 256).
MIN_MAX_LEN = 256


def train_overrides(attention: str, run_dir: Path, steps: int, every: int, seq_len: int) -> list[str]:
    """The train.py command line of one training run of the analysis."""
    return [
        *f"task=listops attention={attention} profile=cpu logger=csv callbacks=analyses "
        f"callbacks.grad_norms.every_n_steps={every} trainer.max_steps={steps} "
        f"trainer.val_check_interval={max(1, steps // 2)} data.seq_len={seq_len} data.max_length={seq_len} "
        f"data.min_length={min(100, seq_len // 2)} data.num_train=4000 data.max_eval_samples=200".split(),
        f"hydra.run.dir={shown(run_dir)}",
    ]


def training_table(runs: dict[str, Path]) -> str:
    """Markdown: per attention, layer and input, the gradient norm's median, min, max, max/min, last value."""
    body = []
    for attention, run_dir in runs.items():
        for key, points in sorted(grad_series(read_metrics(run_dir)).items()):
            values = [value for _, value in points]
            bad = sum(not math.isfinite(value) for value in values)
            finite = sorted(value for value in values if math.isfinite(value)) or [math.nan]
            median, low, high = statistics.median_high(finite), finite[0], finite[-1]
            ratio = high / low if low > 0 else math.inf
            logged = f"{len(values)} ({bad} non-finite)" if bad else str(len(values))
            body.append(
                [attention, key, *(f"{x:.3g}" for x in (median, low, high, ratio, values[-1])), logged]
            )
    header = ["attention", "layer/input", "median", "min", "max", "max/min", "last", "steps logged"]
    return "\n".join(md_table(header, body))


def accuracy_lines(runs: dict[str, Path]) -> list[str]:
    """Each run's final metrics from its summary.json (test/acc: the last weights, as train.py reports)."""
    lines = []
    for attention, run_dir in runs.items():
        summary = read_summary(run_dir)
        if summary is None:
            lines.append(f"- {attention}: no summary.json in {run_dir}")
            continue
        metrics = summary.get("metrics", {})
        keys = ("train/loss", "val/acc", "val/acc_best", "test/acc")
        lines.append(f"- {attention}: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics))
    return lines


def plot_training(runs: dict[str, Path], path: Path) -> Path:
    """q, k, v gradient norms against step (log scale; colour: attention, line style: layer), and the loss."""
    figure = Figure(figsize=(11, 8), layout="constrained")
    axes = figure.subplots(2, 2)
    styles = ("-", "--", ":", "-.")
    for index, (attention, run_dir) in enumerate(runs.items()):
        metrics = read_metrics(run_dir)
        for key, points in sorted(grad_series(metrics).items()):
            layer, name = key.split("/")
            style = styles[int(layer.removeprefix("layer")) % len(styles)]
            axes.flat["qkv".index(name)].plot(
                *zip(*points, strict=True), style, color=f"C{index}", label=f"{attention} {layer}"
            )
        if "train/loss" in metrics:
            axes.flat[3].plot(*zip(*metrics["train/loss"], strict=True), color=f"C{index}", label=attention)
    for axis, name in zip(axes.flat, "qkv", strict=False):
        axis.set(yscale="log", title=f"‖dL/d{name}‖ at the attention input")
    axes.flat[3].set_title("training loss")
    for axis in axes.flat:
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.suptitle(
        f"ListOps, CPU profile: gradient norms of the attention inputs ({device_name()})", fontsize=10
    )
    return save_figure(figure, path)


def operator_scale_sweep(
    scales: Sequence[float] = SCALES, batch: int = 1, heads: int = 4, seq_len: int = 256, head_dim: int = 16
) -> list[dict[str, Any]]:
    """Rows ``{"attention", "scale", "seq_len", "head_dim", "q", "k", "v"}``: the float64 gradient norms of
    <out, dO> for one call on (s·q, s·k, v), for every registered attention and ``UNNORMALISED``."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v, grad_out = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(4))
    variants = [(name, name, OPERATOR_OVERRIDES.get(name, {})) for name in registered_attentions()]
    rows = []
    for label, name, overrides in [*variants, *UNNORMALISED]:
        torch.manual_seed(0)  # the same random parameters (Performer's features) at every run
        module = attention_factory(name, overrides)(
            num_heads=heads, head_dim=head_dim, max_len=max(seq_len, MIN_MAX_LEN)
        )
        module = module.double().eval()
        for scale in scales:
            leaves = [(scale * q).requires_grad_(), (scale * k).requires_grad_(), v.clone().requires_grad_()]
            grads = torch.autograd.grad((module(*leaves) * grad_out).sum(), leaves)
            row = {"attention": label, "scale": scale, "seq_len": seq_len, "head_dim": head_dim}
            rows.append(row | {name: float(grad.norm()) for name, grad in zip("qkv", grads, strict=True)})
    return rows


def plot_scale_sweep(rows: list[dict[str, Any]], path: Path) -> Path:
    figure = Figure(figsize=(13, 4), layout="constrained")
    axes = figure.subplots(1, 3)
    for index, label in enumerate(dict.fromkeys(row["attention"] for row in rows)):
        chosen = [row for row in rows if row["attention"] == label]
        style = "--" if "=" in label else "-"
        for axis, name in zip(axes, "qkv", strict=True):
            xs, ys = [r["scale"] for r in chosen], [r[name] for r in chosen]
            axis.plot(xs, ys, style, marker="o", color=f"C{index}", label=label)
    for axis, name in zip(axes, "qkv", strict=True):
        title = f"‖dL/d{name}‖, one call, N={rows[0]['seq_len']}, d={rows[0]['head_dim']}"
        axis.set(xscale="log", yscale="log", xlabel="scale s of q and k", title=title)
    axes[0].legend(fontsize=7)
    figure.suptitle("Gradient norms against the size of q and k (float64, fixed inputs and dO)", fontsize=10)
    return save_figure(figure, path)


def scale_table(rows: list[dict[str, Any]]) -> str:
    scales = sorted({row["scale"] for row in rows})
    body = []
    for label in dict.fromkeys(row["attention"] for row in rows):
        for name in "qk":
            values = {row["scale"]: row[name] for row in rows if row["attention"] == label}
            body.append([label, name, *(f"{values[s]:.3g}" for s in scales)])
    return "\n".join(md_table(["attention", "input", *(f"s={s:g}" for s in scales)], body))


def main(argv: Sequence[str] | None = None) -> None:
    parser = analysis_parser("gradients", __doc__, REPO_ROOT, "operator sweep only, tiny shapes", "gradients")
    parser.add_argument(
        "--attentions", nargs="+", default=None, help="attentions to train (default: every registered one)"
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=10, help="log gradient norms every this many steps")
    parser.add_argument("--seq-len", type=int, default=256, help="ListOps length (CPU profile: 100..seq_len)")
    args = parser.parse_args(argv)
    attentions = registered_attentions(args.attentions)
    overrides = partial(train_overrides, steps=args.steps, every=args.every, seq_len=args.seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = operator_scale_sweep(**({"seq_len": 16, "head_dim": 4, "heads": 2} if args.smoke else {}))
    plot_scale_sweep(rows, args.out / "gradients_vs_scale.png")
    sections = [
        "# Gradient norms of the attentions",
        "",
        f"Machine: {device_name()}, torch {torch.__version__}.",
        "",
        "## Operator: gradient norms against the scale of q and k",
        "",
        "`python -m lra.analysis.gradients` (the operator part needs no training); figure "
        "`gradients_vs_scale.png`.",
        "",
        scale_table(rows),  # a table ends with its own newline
    ]
    if not args.smoke:
        runs = {name: args.runs_dir / name for name in attentions}
        launch(runs, overrides, args.skip_train, fatal=True)
        plot_training(runs, args.out / "gradients_listops.png")
        example = " ".join(overrides("<attention>", args.runs_dir / "<attention>"))
        sections += [
            "## Training: per-layer gradient norms at the attention inputs, ListOps (CPU profile)",
            "",
            f"Each run: `python train.py {example}`; figure `gradients_listops.png`.",
            "",
            *accuracy_lines(runs),
            "",
            training_table(runs),
        ]
    atomic_write_text(args.out / "gradients.md", "\n".join(sections))
    print(f"wrote {args.out / 'gradients.md'}")


if __name__ == "__main__":
    run_cli(main, prog="python -m lra.analysis.gradients")
