"""Attention maps: the weights of every layer and head on one fixed example, as PNG (and W&B images).

During training: ``python train.py callbacks=attention_maps`` (see ``AttentionMaps``). From saved
checkpoints, several runs side by side on the same input (each rebuilt from its ``config_resolved.yaml``)::

    python -m lra.analysis.maps --out results/analyses/maps_listops.png \\
        --checkpoints outputs/a/checkpoints/last.ckpt outputs/b/checkpoints/last.ckpt

The linear-time attentions are shown in their quadratic reference form (``models.attention.maps``), for this
one example only. Linformer has no token-to-token matrix: its columns are the k projected keys E·K.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from lra.analysis.capture import add_attention_pre_hooks
from lra.analysis.runs import load_run, save_figure
from lra.errors import ConfigError, run_cli
from lra.module import model_inputs
from models.attention.maps import attention_weights, key_axis_label
from models.heads import LRAModel

PANEL_INCHES = 3.0
DPI = 100


@dataclass
class LayerMaps:
    """One layer's maps on one example, cropped to its real tokens: ``weights`` is
    ``[len(heads), queries, keys]`` float32, and ``key_label`` says what the columns index."""

    layer: int
    heads: list[int]
    weights: np.ndarray
    attention: str
    key_label: str


def _select(requested: Sequence[int] | None, available: int, what: str) -> list[int]:
    chosen = list(range(available)) if requested is None else [int(index) for index in requested]
    bad = [index for index in chosen if not 0 <= index < available]
    if bad:
        raise ConfigError(f"attention maps: {what} {bad} out of range; the model has {available} {what}")
    return chosen


def example_maps(
    model: LRAModel,
    example: Mapping[str, Tensor],
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    max_tokens: int | None = None,
) -> list[LayerMaps]:
    """Each chosen layer's attention weights on one example (a batch of size 1), in eval mode, with rows and
    columns at padded tokens dropped and at most ``max_tokens`` real positions kept; None keeps all."""
    encoder = model.encoder
    layer_ids = _select(layers, len(encoder.attentions), "layers")
    head_ids = _select(heads, encoder.attentions[0].num_heads, "heads")
    # The first call per layer: a dual encoder (Retrieval) calls each layer again for its second document.
    calls: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {}
    handles = add_attention_pre_hooks(
        encoder, lambda layer, _, q, k, v, mask=None: calls.setdefault(layer, (q, k, mask))
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**model_inputs(example))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    result = []
    for layer in layer_ids:
        (q, k, mask), module = calls[layer], encoder.attentions[layer]
        weights = attention_weights(module, q, k, mask)[0, head_ids].cpu()  # [h, N, N or k]
        real = torch.ones(weights.shape[1], dtype=torch.bool) if mask is None else mask[0].cpu()
        positions = real.nonzero().squeeze(1)[:max_tokens]
        weights = weights[:, positions]
        label = key_axis_label(module)
        if label == "key":
            weights = weights[:, :, positions]
        result.append(LayerMaps(layer, head_ids, weights.float().numpy(), module.name, label))
    return result


def save_grid(
    grid: Sequence[Sequence[tuple[np.ndarray, str]]],
    path: Path,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
) -> Path:
    """One PNG of ``rows·300 × cols·300`` pixels; ``grid[row][col]`` is a queries × keys array and what its
    columns index, each panel on its own 0 → max scale (weights are ~1/N: a shared scale would hide the
    pattern)."""
    rows, cols = len(grid), len(grid[0])
    figure = Figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI, layout="constrained")
    for (r, c), axis in np.ndenumerate(figure.subplots(rows, cols, squeeze=False)):
        panel, x_label = grid[r][c]
        # One sharp block per weight when the panel has fewer entries than pixels (and a smaller PNG).
        interpolation = "nearest" if max(panel.shape) <= PANEL_INCHES * DPI else "antialiased"
        vmax = max(float(panel.max()), 1e-12)
        axis.imshow(panel, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation=interpolation)
        axis.set(xticks=[], yticks=[])
        axis.set_xlabel(f"{x_label} (max {panel.max():.3g})", fontsize=7)
        if c == 0:
            axis.set_ylabel(f"{row_labels[r]}\nquery", fontsize=8)
        if r == 0:
            axis.set_title(col_labels[c], fontsize=8)
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, path, dpi=DPI)


class AttentionMaps(L.Callback):
    """Every ``every_n_val`` validations (sanity checks excluded), render the maps of one fixed example.

    The example is row ``example_index`` of the first validation batch, taken once and kept. Maps go to
    ``<out_dir>/step<global step>/maps.png`` (plus ``maps.npz``, ``layer<i>: [heads, queries, keys]``, with
    ``save_arrays``) and, with a W&B logger, to the image key ``attention_maps``. ``layers`` / ``heads``:
    indices to render (None: all); ``max_tokens``: crop to the first real tokens (None: all).
    """

    def __init__(
        self,
        out_dir: str = "attention_maps",
        every_n_val: int = 1,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        example_index: int = 0,
        max_tokens: int | None = None,
        save_arrays: bool = False,
    ) -> None:
        if every_n_val < 1:
            raise ValueError(f"AttentionMaps: every_n_val must be >= 1, got {every_n_val}")
        self.out_dir = Path(out_dir)
        self.every_n_val = every_n_val
        self.layers, self.heads = layers, heads  # checked against the model when rendered
        self.example_index = example_index
        self.max_tokens = max_tokens
        self.save_arrays = save_arrays
        self.example: dict[str, Tensor] | None = None
        self.validations = 0
        self.last_maps: list[LayerMaps] = []

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.example is not None or batch_idx != 0 or dataloader_idx != 0:
            return
        size = batch["label"].shape[0]
        if not 0 <= self.example_index < size:
            raise ConfigError(
                f"AttentionMaps: example_index={self.example_index} is outside the first validation batch "
                f"(size {size}); choose an index below {size}"
            )
        row = slice(self.example_index, self.example_index + 1)
        self.example = {key: value[row].detach().cpu().clone() for key, value in batch.items()}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.example is None or not trainer.is_global_zero:
            return
        self.validations += 1
        if self.validations % self.every_n_val == 0:
            self.render(pl_module, trainer.global_step, trainer.loggers)

    def render(self, pl_module: L.LightningModule, step: int, loggers: Sequence[Any] = ()) -> Path:
        """Render the kept example's maps for ``pl_module.model`` now; returns the PNG path."""
        example = {key: value.to(pl_module.device) for key, value in self.example.items()}
        maps = self.last_maps = example_maps(
            pl_module.model, example, self.layers, self.heads, self.max_tokens
        )
        step_dir = self.out_dir / f"step{step}"
        title = (
            f"{maps[0].attention} attention, validation example {self.example_index} "
            f"(label {int(self.example['label'][0])}), step {step}"
        )
        grid = [[(weights, m.key_label) for weights in m.weights] for m in maps]
        rows, columns = [f"layer {m.layer}" for m in maps], [f"head {h}" for h in maps[0].heads]
        path = save_grid(grid, step_dir / "maps.png", rows, columns, title)
        if self.save_arrays:
            np.savez_compressed(step_dir / "maps.npz", **{f"layer{m.layer}": m.weights for m in maps})
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="attention_maps", images=[str(path)], step=step, caption=[title])
        return path


def example_from(datamodule: Any, split: str, index: int) -> dict[str, Tensor]:
    """Example ``index`` of a split (``val`` or ``test``), as a batch of size 1."""
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    dataset = loader.dataset
    if not 0 <= index < len(dataset):
        raise ConfigError(f"--example {index} is outside the {split} split ({len(dataset)} examples)")
    return {key: torch.as_tensor(value)[None] for key, value in dataset[index].items()}


def compare_checkpoints(
    paths: Sequence[Path],
    out: Path,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] = (0,),
    split: str = "val",
    index: int = 0,
    max_tokens: int | None = None,
) -> Path:
    """Render one example through several trained runs: columns are runs, rows are (layer, head) pairs."""
    first, datamodule = load_run(paths[0])
    runs = [first]
    # The same task data, whatever the batch size or loader settings.
    ignored = ("batch_size", "num_workers", "max_eval_samples")
    data = {k: v for k, v in dict(first.config.data).items() if k not in ignored}
    for path in paths[1:]:
        run, _ = load_run(path, datamodule)
        if data != {k: v for k, v in dict(run.config.data).items() if k not in ignored}:
            raise ConfigError(
                f"{path} was trained on different data than {paths[0]} (its config's data section differs); "
                f"compare runs of the same task and sequence length"
            )
        runs.append(run)
    example = example_from(datamodule, split, index)
    per_run = [example_maps(run.model, example, layers, heads, max_tokens) for run in runs]
    grid, row_labels = [], []
    for position, layer_maps in enumerate(per_run[0]):
        for head_position, head in enumerate(layer_maps.heads):
            grid.append(
                [(maps[position].weights[head_position], maps[position].key_label) for maps in per_run]
            )
            row_labels.append(f"layer {layer_maps.layer}, head {head}")
    col_labels = []
    for run in runs:
        accuracy = run.summary.get("metrics", {}).get("test/acc")
        col_labels.append(run.name if accuracy is None else f"{run.name} (test acc {accuracy:.3f})")
    task = first.config.get("task", {}).get("name", "task")
    title = (
        f"{task}: {split} example {index} (label {int(example['label'][0])}); each panel scaled 0 → its max"
    )
    return save_grid(grid, out, row_labels, col_labels, title)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m lra.analysis.maps",
        description="Attention maps of several trained runs side by side on the same input.",
    )
    parser.add_argument("--checkpoints", nargs="+", type=Path, required=True, help=".ckpt files or run dirs")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--layers", nargs="*", type=int, default=None, help="layer indices (default: all)")
    parser.add_argument("--heads", nargs="+", type=int, default=[0], help="head indices (default: 0)")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--example", type=int, default=0, help="index of the example in the split")
    parser.add_argument("--max-tokens", type=int, default=None, help="crop to the first real tokens")
    args = parser.parse_args(argv)
    path = compare_checkpoints(
        args.checkpoints, args.out, args.layers or None, args.heads, args.split, args.example, args.max_tokens
    )
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(main, prog="python -m lra.analysis.maps")
