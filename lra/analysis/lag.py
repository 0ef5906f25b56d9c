"""Why an attention lags: how sharp its rows are at initialisation and after training, and how τ moved.

    python -m lra.analysis.lag --runs <run dir> <run dir> ... --out results/analyses/lag_listops

Per ``train.py`` run directory and per layer and head, on the first ``--examples`` validation examples, at
initialisation (rebuilt with the run's seed exactly as ``train.py`` builds it) and at the last checkpoint:
the entropy of each real query row over the real keys / log N (1 = uniform, 0 = one key) and the largest
weight × N (1 = uniform). For attentions that log τ per head (``attention/layer<l>/tau_<h>``), τ over
training beside the path AdamW's decoupled weight decay alone would give, τ_t = τ_0 · Π_{s<t} (1 − lr_s·wd):
where the two coincide, the loss moved τ no more than weight decay did. Writes ``<out>.md`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from data.cache import atomic_write_text
from lra.analysis.maps import example_from, example_maps
from lra.analysis.runs import load_run, model_from_config, read_metrics, save_figure
from lra.errors import MissingDataError, run_cli
from lra.markdown import md_table
from lra.schedules import lr_multiplier
from models.heads import LRAModel

TAU_COLUMN = re.compile(r"attention/layer(\d+)/tau_(\d+)$")


@dataclass
class Sharpness:
    """Mean normalised row entropy and mean (max weight × N) of one layer and head."""

    layer: int
    head: int
    entropy: float
    peak: float


def row_sharpness(model: LRAModel, examples: Sequence[dict[str, torch.Tensor]]) -> list[Sharpness]:
    """Per layer and head, over the real query rows of ``examples``: H(row)/log N and N·max(row)."""
    sums: dict[tuple[int, int], np.ndarray] = {}
    for example in examples:
        for layer_maps in example_maps(model, example):
            weights = torch.from_numpy(layer_maps.weights).double()  # [heads, N, keys], real tokens only
            keys = weights.shape[-1]
            if keys < 2:
                continue
            entropy = -(weights * torch.log(weights.clamp_min(1e-300))).sum(-1) / math.log(keys)
            peak = weights.amax(-1) * keys
            for index, head in enumerate(layer_maps.heads):
                bucket = sums.setdefault((layer_maps.layer, head), np.zeros(3))
                bucket += (float(entropy[index].sum()), float(peak[index].sum()), entropy.shape[1])
    return [
        Sharpness(layer, head, entropy / rows, peak / rows)
        for (layer, head), (entropy, peak, rows) in sorted(sums.items())
    ]


def initial_model(run_dir: Path, datamodule: object) -> LRAModel:
    """The run's model at step 0: train.py seeds, then instantiates the attention and builds the model."""
    config = OmegaConf.load(run_dir / "config_resolved.yaml")
    L.seed_everything(int(config.seed), workers=True, verbose=False)
    return model_from_config(config, datamodule).eval()


def tau_history(run_dir: Path) -> dict[tuple[int, int], list[tuple[int, float]]]:
    """τ per (layer, head) at each validation, from the run's CSV log (empty without one)."""
    try:
        metrics = read_metrics(run_dir)
    except MissingDataError:
        return {}
    # Lightning logs validation values at the step before the one they follow.
    return {
        (int(match[1]), int(match[2])): [(step + 1, value) for step, value in points]
        for column, points in metrics.items()
        if (match := TAU_COLUMN.match(column))
    }


def decay_only_tau(config: object, tau_init: float, steps: int) -> np.ndarray:
    """τ under decoupled weight decay alone: τ_t = τ_0 Π_{s<t}(1 − lr_s·wd), for t = 0..steps."""
    scheduler = config.scheduler
    multiplier = lr_multiplier(scheduler["name"], scheduler["warmup_steps"], scheduler["total_steps"])
    lr, decay = float(config.optim.lr), float(config.optim.weight_decay)
    factors = [1.0 - lr * multiplier(step) * decay for step in range(steps)]
    return tau_init * np.concatenate([[1.0], np.cumprod(factors)])


def analyse(run_dirs: Sequence[Path], out: Path, num_examples: int = 8) -> tuple[Path, Path]:
    """Write ``out``.md and ``out``.png for ``run_dirs``; returns both paths."""
    rows, tau_rows = [], []
    figure = Figure(figsize=(14, 4.5))
    tau_axis, bar_axis = figure.subplots(1, 2)
    bars: list[tuple[str, float, float]] = []
    datamodule = None
    for run_dir in run_dirs:
        loaded, datamodule = load_run(run_dir, datamodule)
        examples = [example_from(datamodule, "val", index) for index in range(num_examples)]
        end = row_sharpness(loaded.model, examples)
        start = row_sharpness(initial_model(run_dir, datamodule), examples)
        for first, last in zip(start, end, strict=True):
            cells = (run_dir.name, loaded.name, first.layer, first.head, f"{first.entropy:.3f}")
            rows.append([*map(str, cells), f"{last.entropy:.3f}", f"{first.peak:.1f}", f"{last.peak:.1f}"])
            bars.append((f"{loaded.name}\nL{first.layer}h{first.head}", first.peak, last.peak))
        history = tau_history(run_dir)
        if not history:
            continue
        steps = max(step for points in history.values() for step, _ in points)
        tau_init = float(loaded.config.attention.get("tau_init", 1.0))
        decayed = decay_only_tau(loaded.config, tau_init, steps)
        tau_axis.plot(range(steps + 1), decayed, "k--", linewidth=2, label="weight decay alone")
        for (layer, head), points in sorted(history.items()):
            xs, ys = zip(*points, strict=True)
            tau_axis.plot(xs, ys, marker=".", label=f"{run_dir.name} ({loaded.name}) L{layer} h{head}")
            cells = (run_dir.name, layer, head, f"{tau_init:.3f}", f"{ys[-1]:.3f}", f"{decayed[xs[-1]]:.3f}")
            tau_rows.append(list(map(str, cells)))
    tau_axis.set(xlabel="training step", ylabel="τ", title="TaylorShift temperature per head")
    if tau_axis.lines:
        tau_axis.legend(fontsize=6, ncol=2)
    positions = np.arange(len(bars))
    bar_axis.bar(positions - 0.2, [bar[1] for bar in bars], 0.4, label="initialisation")
    bar_axis.bar(positions + 0.2, [bar[2] for bar in bars], 0.4, label="end of training")
    bar_axis.set_xticks(positions, [bar[0] for bar in bars], fontsize=6)
    bar_axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    bar_axis.set(ylabel="largest weight × N (1 = uniform row)", title="How peaked the rows are, per head")
    bar_axis.legend()
    figure.tight_layout()
    png = save_figure(figure, out.with_suffix(".png"), metadata={"Software": None})
    md = out.with_suffix(".md")
    header = ["run", "attention", "layer", "head", "entropy/log N at init", "at end", "N·max at init"]
    tau_header = ["run", "layer", "head", "τ at start", "τ at end", "τ by weight decay alone"]
    lines = [
        f"Attention-row sharpness on {num_examples} validation examples (real tokens only), per layer "
        "and head.",
        "",
        *md_table([*header, "at end"], rows),
        "τ per head (TaylorShift), from the CSV log:",
        "",
        *md_table(tau_header, tau_rows),
    ]
    atomic_write_text(md, "\n".join(lines))
    return md, png


def main(argv: Sequence[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m lra.analysis.lag",
        description="Attention-row entropy at init and end, and τ against weight decay, for trained runs.",
    )
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="train.py run directories")
    parser.add_argument("--out", type=Path, default=Path("outputs/analyses/lag"), help="path stem")
    parser.add_argument("--examples", type=int, default=8, help="validation examples to average over")
    args = parser.parse_args(argv)
    md, png = analyse(args.runs, args.out, args.examples)
    print(f"wrote {md} and {png}")
    return md, png


if __name__ == "__main__":
    run_cli(main, prog="python -m lra.analysis.lag")
