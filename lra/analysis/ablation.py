"""Normalisation ablation: TaylorShift and Fastmax with their normalisation switched off, in low precision.

    python -m lra.analysis.ablation                  # operator part + short fp16/bf16 ListOps-2000 runs
    python -m lra.analysis.ablation --skip-train     # report from the runs already in --runs-dir
    python -m lra.analysis.ablation --smoke --out /tmp/a   # operator part on small shapes (seconds)

* Operator: the efficient-mode sums with every tensor held in fp16 / bf16 / fp32 (the official code under
  autocast), and the module itself (states accumulated in fp32), against float64, with and without each
  normalisation, at several N and input scales s (q, k multiplied by s).
* Training: ``--steps`` ListOps steps at 2000 tokens in fp16 (with loss scaling) and bf16 mixed precision,
  each ablated configuration beside the normalised one, recording the loss and the attention-input gradient
  norms per step; non-finite losses are skipped steps, so a run shows them instead of stopping.

Writes ``ablation.md`` and ``ablation_training.png`` to ``--out`` (default ``outputs/analyses``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from data.cache import atomic_write_text
from lra.analysis.runs import analysis_parser, grad_series, launch, read_metrics, save_figure, shown
from lra.errors import MissingDataError, run_cli
from lra.markdown import md_table
from lra.registry import attention_factory
from lra.summary import REPO_ROOT, device_name

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Operator schemes: what is normalised before the sums.
SCHEMES = {
    "taylorshift": "TaylorShift scheme: L2 q, k (τ = 1), d^(1/4), V'/N",
    "taylorshift-no-1/N": "TaylorShift without the 1/N value scaling",
    "taylorshift-off": "TaylorShift normalize_input=false: raw q·k/√d, no d^(1/4), no 1/N",
    "fastmax": "Fastmax maxnorm (lim 1), V'/N",
    "fastmax-none": "Fastmax normalize=none: raw q·k, V'/N",
}
# The ablated configurations, trained and measured: label -> (attention, constructor overrides). TaylorShift's
# "off" also drops the √(N_v/d) output scale, as the official module does with normalize_input=False.
ABLATED = {
    "taylorshift": ("taylorshift", {}),
    "taylorshift-off": ("taylorshift", {"normalize_input": False, "output_norm": False}),
    "fastmax": ("fastmax", {}),
    "fastmax-none": ("fastmax", {"normalize": "none"}),
}
# The operator part measures TaylorShift's efficient sums; the emulation has no output scale to compare.
OPERATOR_OVERRIDES = {"taylorshift": {"mode": "efficient", "output_norm": False}}
PRECISIONS = {
    "fp16": [
        "trainer.precision=null",
        # Lightning turns precision=16-mixed into bf16 on a CPU; the plugin keeps fp16 autocast + GradScaler.
        "++trainer.plugins=[{_target_:lightning.pytorch.plugins.precision.MixedPrecision,"
        "precision:16-mixed,device:cpu}]",
    ],
    "bf16": ["trainer.precision=bf16-mixed"],
}


def _quadratic(x: Tensor) -> Tensor:
    return (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)


def prepared(q: Tensor, k: Tensor, scheme: str) -> tuple[Tensor, Tensor, tuple[float, float, float], bool]:
    """Q, K, coefficients (a, b, c) of Y' = a(Q⊠Q)S2 + b·Q·S1 + c·S0, and whether V' is divided by N."""
    d = q.shape[-1]
    if scheme.startswith("taylorshift"):
        if scheme == "taylorshift-off":
            return q / math.sqrt(d), k, (0.5, 1.0, 1.0), False
        scale = d**0.25
        q, k = F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1) * scale
        return q, k, (0.5, scale**2, scale**4), scheme == "taylorshift"
    if scheme == "fastmax":
        q = q / q.norm(dim=-1).amax(dim=-1, keepdim=True)[..., None]
        k = k / k.norm(dim=-1).amax(dim=-1, keepdim=True)[..., None]
    return q, k, (0.5, 1.0, 1.0), True


def emulated_efficient(q: Tensor, k: Tensor, v: Tensor, scheme: str, dtype: torch.dtype) -> Tensor:
    """Factorised polynomial attention with every operand and state held in ``dtype`` (no fp32 accumulation
    outside the matmul kernels), as the official code computes it under autocast; ``[B, H, N, d]`` float64.
    The normalisation (the part that bounds the values) runs in float64 first, then everything is cast.
    In float64 this is the reference: it matches the N×N definition to ~1e-15 and stays cheap at N = 70k."""
    q, k, (a, b, c), divide = prepared(q.double(), k.double(), scheme)
    v_aug = torch.cat([torch.ones_like(v[..., :1]), v], dim=-1).double()
    if divide:
        v_aug = v_aug / v.shape[2]
    q, k, v_aug = q.to(dtype), k.to(dtype), v_aug.to(dtype)
    s2 = _quadratic(k).transpose(-1, -2) @ v_aug
    s1 = k.transpose(-1, -2) @ v_aug
    s0 = v_aug.sum(dim=-2, keepdim=True)
    out = a * (_quadratic(q) @ s2) + b * (q @ s1) + c * s0
    return (out[..., 1:] / out[..., :1]).double()


@torch.no_grad()
def module_output(q: Tensor, k: Tensor, v: Tensor, scheme: str, dtype: torch.dtype) -> Tensor:
    """The registered module itself (states accumulated in fp32) on inputs in ``dtype``."""
    name, overrides = ABLATED[scheme]
    module = attention_factory(name, {**overrides, **OPERATOR_OVERRIDES.get(name, {})})(
        num_heads=q.shape[1], head_dim=q.shape[-1], max_len=q.shape[2]
    )
    return module(q.to(dtype), k.to(dtype), v.to(dtype)).double()


def _errors(prefix: str, out: Tensor, truth: Tensor) -> dict[str, float]:
    finite = torch.isfinite(out)
    error = ((out - truth).abs().amax(dim=-1) / truth.abs().amax(dim=-1).clamp_min(1e-30))[finite.all(dim=-1)]
    return {
        f"{prefix}_nonfinite": float((~finite).float().mean()),
        f"{prefix}_zero_rows": float((out == 0).all(dim=-1).float().mean()),
        f"{prefix}_max_rel_error": float(error.max()) if error.numel() else math.nan,
    }


def operator_rows(
    seq_lens: Sequence[int] = (4096, 70_000), scales: Sequence[float] = (1.0, 4.0, 16.0), head_dim: int = 8
) -> list[dict[str, Any]]:
    """Every (scheme, N, s, dtype): the emulation's and the module's failure rates against float64."""
    rows = []
    for seq_len in seq_lens:
        generator = torch.Generator().manual_seed(seq_len)
        q, k, v = (torch.randn(1, 1, seq_len, head_dim, generator=generator) for _ in range(3))
        for scale in scales:
            sq, sk = scale * q, scale * k
            for scheme in SCHEMES:
                truth = emulated_efficient(sq, sk, v, scheme, torch.float64)
                for dtype_name, dtype in DTYPES.items():
                    row = {"scheme": scheme, "seq_len": seq_len, "scale": scale, "dtype": dtype_name}
                    row |= _errors("emulated", emulated_efficient(sq, sk, v, scheme, dtype), truth)
                    if scheme in ABLATED:  # the 1/N switch exists only in the emulation
                        row |= _errors("module", module_output(sq, sk, v, scheme, dtype), truth)
                    rows.append(row)
    return rows


def _cell(row: dict[str, Any], prefix: str) -> str:
    """``ok (max relative error)`` or, in bold, what failed."""
    nonfinite, zero_rows = row[f"{prefix}_nonfinite"], row[f"{prefix}_zero_rows"]
    error = row[f"{prefix}_max_rel_error"]
    if nonfinite == 0 and zero_rows == 0 and error < 0.05:
        return f"ok ({error:.0e})"
    parts = [f"{100 * nonfinite:.0f}% inf/nan"] if nonfinite else []
    parts += [f"{100 * zero_rows:.0f}% zero rows"] if zero_rows else []
    parts += [f"err {error:.2g}"] if math.isfinite(error) and error >= 0.05 else []
    return "**" + ", ".join(parts) + "**"


def operator_table(rows: list[dict[str, Any]]) -> str:
    """One line per (scheme, dtype, implementation), one column per (N, s): ok or what failed."""
    columns = list(dict.fromkeys((row["seq_len"], row["scale"]) for row in rows))
    body = []
    for scheme, dtype in itertools.product(SCHEMES, DTYPES):
        chosen = [r for r in rows if r["scheme"] == scheme and r["dtype"] == dtype]
        for prefix, what in (("emulated", "in dtype"), ("module", "fp32 (module)")):
            if f"{prefix}_nonfinite" in chosen[0]:
                body.append([scheme, dtype, what, *(_cell(row, prefix) for row in chosen)])
    header = ["scheme", "dtype", "states", *(f"N={n}, s={s:g}" for n, s in columns)]
    return "\n".join(md_table(header, body))


def train_overrides(key: tuple[str, str], run_dir: Path, steps: int, seq_len: int) -> list[str]:
    """The train.py command line of the ablation run of ``key``: (label, precision)."""
    label, precision = key
    attention, overrides = ABLATED[label]
    words = [
        f"task=listops attention={attention}",
        *(f"attention.{key}={str(value).lower()}" for key, value in overrides.items()),
        "profile=cpu logger=csv callbacks=grad_norms callbacks.grad_norms.every_n_steps=1",
        *PRECISIONS[precision],
        f"trainer.max_steps={steps} trainer.val_check_interval={steps} trainer.log_every_n_steps=1",
        "++trainer.max_nonfinite_steps=1000000",
        "optim.lr=1e-3 scheduler.name=constant scheduler.warmup_steps=0",
        f"data.seq_len={seq_len} data.max_length={seq_len} data.min_length={seq_len * 3 // 4} "
        "data.batch_size=4 data.num_train=400 data.num_val=16 data.num_test=16 data.max_eval_samples=16",
    ]
    return [*" ".join(words).split(), f"hydra.run.dir={shown(run_dir)}"]


def run_record(run_dir: Path) -> dict[str, Any]:
    """The exit code, the loss per step and the largest attention-input (q, k) gradient norm per step."""
    exit_code = int((run_dir / "exit_code").read_text()) if (run_dir / "exit_code").is_file() else None
    try:
        metrics = read_metrics(run_dir)
    except MissingDataError:
        return {"exit_code": exit_code, "loss": [], "grad_max": []}
    by_step: dict[int, float] = {}
    for key, points in grad_series(metrics).items():
        if key.endswith(("/q", "/k")):
            for step, value in points:
                by_step[step] = max(by_step.get(step, 0.0), value)
    return {
        "exit_code": exit_code,
        "loss": metrics.get("train/loss", []),
        "grad_max": sorted(by_step.items()),
    }


def training_table(runs: dict[tuple[str, str], Path]) -> str:
    header = "variant|precision|exit|steps logged|non-finite loss|first / last loss|max ‖dL/dq,k‖ (finite)|"
    body = []
    for (label, precision), run_dir in runs.items():
        record = run_record(run_dir)
        losses = [value for _, value in record["loss"]]
        grads = [value for _, value in record["grad_max"]]
        finite_grads = [value for value in grads if math.isfinite(value)]
        first_last = f"{losses[0]:.3g} / {losses[-1]:.3g}" if losses else "n/a"
        nonfinite = sum(not math.isfinite(value) for value in losses)
        cells = (label, precision, record["exit_code"], len(losses), nonfinite, first_last)
        cells += (f"{max(finite_grads, default=math.nan):.3g}", len(grads) - len(finite_grads))
        body.append(list(map(str, cells)))
    return "\n".join(md_table((header + "non-finite grad steps").split("|"), body))


def plot_training(runs: dict[tuple[str, str], Path], path: Path) -> Path:
    precisions = list(dict.fromkeys(precision for _, precision in runs))
    figure = Figure(figsize=(11, 3.5 * len(precisions)), layout="constrained")
    axes = figure.subplots(len(precisions), 2, squeeze=False)
    for (label, precision), run_dir in runs.items():
        record = run_record(run_dir)
        style = "--" if label.endswith(("-off", "-none")) else "-"
        colour = f"C{list(ABLATED).index(label)}"
        for axis, key in zip(axes[precisions.index(precision)], ("loss", "grad_max"), strict=True):
            if record[key]:
                axis.plot(*zip(*record[key], strict=True), style, color=colour, label=label)
    for row, precision in enumerate(precisions):
        axes[row][0].set_title(f"{precision}: training loss (gaps = non-finite)")
        axes[row][1].set(title=f"{precision}: max over layers of ‖dL/dq‖, ‖dL/dk‖", yscale="log")
        for axis in axes[row]:
            axis.set_xlabel("step")
            axis.legend(fontsize=7)
    figure.suptitle(
        f"Normalisation ablation, ListOps 2000 tokens, CPU profile model ({device_name()})", fontsize=10
    )
    return save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = analysis_parser("ablation", __doc__, REPO_ROOT, "operator part only, small shapes", "ablation")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=2000)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    args = parser.parse_args(argv)
    overrides = partial(train_overrides, steps=args.steps, seq_len=args.seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = operator_rows(**({"seq_lens": (256,), "scales": (1.0, 16.0)} if args.smoke else {}))
    sections = [
        "# Normalisation ablation: TaylorShift and Fastmax without their normalisation",
        "",
        f"Machine: {device_name()}, torch {torch.__version__}. Command: `python -m lra.analysis.ablation`.",
        "",
        "## Operator: low-precision sums (d = 8, q, k, v ~ N(0, 1) times s for q and k)",
        "",
        "Schemes: " + "; ".join(f"`{name}` = {text}" for name, text in SCHEMES.items()) + ".",
        "Emulated: every operand and state held in the dtype (the official code under autocast).",
        "Module: the registered attention on inputs in the dtype (states in fp32, spec 1).",
        "ok (max relative error) = every row finite, non-zero and within 5% of the float64 result.",
        "",
        operator_table(rows),  # a table ends with its own newline
    ]
    if not args.smoke:
        runs = {(label, p): args.runs_dir / f"{label}-{p}" for p in args.precisions for label in ABLATED}
        launch(runs, overrides, args.skip_train)
        plot_training(runs, args.out / "ablation_training.png")
        example = " ".join(overrides(("taylorshift-off", "fp16"), args.runs_dir / "taylorshift-off-fp16"))
        sections += [
            f"## Training: ListOps at {args.seq_len} tokens, {args.steps} steps, lr 1e-3 constant, batch 4",
            "",
            f"Example run: `python train.py {example}`; figure `ablation_training.png`.",
            "",
            training_table(runs),
        ]
    atomic_write_text(args.out / "ablation.md", "\n".join(sections))
    print(f"wrote {args.out / 'ablation.md'}")


if __name__ == "__main__":
    run_cli(main, prog="python -m lra.analysis.ablation")
