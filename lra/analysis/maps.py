"""Attention maps: the weights of every layer and head on one fixed example, as PNG (and W&B images).

During training (off by default): ``python train.py callbacks=attention_maps`` adds ``AttentionMaps`` to the
default callbacks; every ``every_n_val`` validations it renders the first validation example's maps to
``<run dir>/attention_maps/step<k>/maps.png`` and logs them to W&B when a W&B logger is present.

From saved checkpoints, several attentions side by side on the same input:

    python -m lra.analysis.maps --out results/analyses/maps_listops.png \\
        --checkpoints outputs/a/checkpoints/last.ckpt outputs/b/checkpoints/last.ckpt

Each run is rebuilt from its ``config_resolved.yaml`` (the run directory is the checkpoint's grandparent).
The linear-time attentions are shown in their quadratic reference form (``models.attention.maps``), computed
for this one example only. Linformer has no token-to-token matrix: its columns are the k projected keys E·K.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from lra.analysis.capture import captured_attention_calls
from lra.analysis.runs import pyplot, save_figure
from lra.errors import ConfigError, MissingCheckpointError, run_cli
from lra.module import model_inputs
from models.attention.maps import attention_weights, key_axis_label
from models.heads import LRAModel

PANEL_INCHES = 3.0
DPI = 100


@dataclass
class LayerMaps:
    """The maps of one layer on one example, cropped to its real tokens.

    Attributes:
        layer: layer index.
        heads: the head indices kept, in order.
        weights: ``[len(heads), queries, keys]`` float32 (keys are projected keys for Linformer).
        attention: the module's ``name``.
        key_label: what the columns index (``key`` or ``projected key (E·K)``).
    """

    layer: int
    heads: list[int]
    weights: np.ndarray
    attention: str
    key_label: str


def _select(requested: Sequence[int] | None, available: int, what: str) -> list[int]:
    if requested is None:
        return list(range(available))
    chosen = [int(index) for index in requested]
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
    """Run ``model`` on one example (eval mode, no grad) and return each chosen layer's attention weights.

    Args:
        model: the encoder plus head.
        example: a batch of size 1 with the model's input keys (``input_ids [1, L]``, ``mask``, ...).
        layers, heads: indices to keep; None keeps all.
        max_tokens: keep at most this many real query (and key) positions, for readable images.

    Returns:
        One ``LayerMaps`` per chosen layer; rows and columns at padded tokens are dropped.
    """
    encoder = model.encoder
    layer_ids = _select(layers, len(encoder.attentions), "layers")
    head_ids = _select(heads, encoder.attentions[0].num_heads, "heads")
    inputs = model_inputs(example)
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError(
            f"attention maps: expected one example, got a batch of {inputs['input_ids'].shape[0]}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), captured_attention_calls(encoder) as calls:
            model(**inputs)
    finally:
        model.train(was_training)
    result = []
    for layer in layer_ids:
        call, module = calls[layer], encoder.attentions[layer]
        weights = attention_weights(module, call.q, call.k, call.mask)[0, head_ids]  # [h, N, N or k]
        real = torch.ones(weights.shape[1], dtype=torch.bool) if call.mask is None else call.mask[0].cpu()
        positions = real.nonzero().squeeze(1)[:max_tokens]
        weights = weights.cpu()[:, positions]
        if key_axis_label(module) == "key":
            weights = weights[:, :, positions]
        result.append(
            LayerMaps(layer, head_ids, weights.float().numpy(), module.name, key_axis_label(module))
        )
    return result


def save_grid(
    grid: Sequence[Sequence[np.ndarray | None]],
    path: Path,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    x_labels: Sequence[Sequence[str]] | None = None,
) -> Path:
    """Write a grid of maps as one PNG of ``rows·300 × cols·300`` pixels; each panel scaled 0 → its max.

    Args:
        grid: ``grid[row][col]`` a 2-D array (queries × keys) or None for an empty panel.
        path: the PNG to write (parents are created).
        row_labels, col_labels: panel labels (the y label of the first column, the titles of the first row).
        title: figure title.
        x_labels: per-panel x-axis label (defaults to "key").
    """
    plt = pyplot()

    rows, cols = len(grid), max(len(row) for row in grid)
    figure, axes = plt.subplots(
        rows,
        cols,
        figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES),
        dpi=DPI,
        squeeze=False,
        layout="constrained",
    )
    for r in range(rows):
        for c in range(cols):
            axis = axes[r][c]
            panel = grid[r][c] if c < len(grid[r]) else None
            if panel is None:
                axis.axis("off")
                continue
            # Each panel on its own scale: convex weights are ~1/N, so a shared scale would hide the pattern.
            # One sharp block per weight when the panel has fewer entries than pixels (and a smaller PNG).
            interpolation = "nearest" if max(panel.shape) <= PANEL_INCHES * DPI else "antialiased"
            axis.imshow(
                panel,
                cmap="viridis",
                vmin=0.0,
                vmax=max(float(panel.max()), 1e-12),
                aspect="auto",
                interpolation=interpolation,
            )
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_xlabel(f"{x_labels[r][c] if x_labels else 'key'} (max {panel.max():.3g})", fontsize=7)
            if c == 0:
                axis.set_ylabel(f"{row_labels[r]}\nquery", fontsize=8)
            if r == 0:
                axis.set_title(col_labels[c], fontsize=8)
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, path, dpi=DPI)


def render_layer_maps(maps: Sequence[LayerMaps], path: Path, title: str) -> Path:
    """One PNG: rows are layers, columns are heads."""
    grid = [[m.weights[i] for i in range(len(m.heads))] for m in maps]
    row_labels = [f"layer {m.layer}" for m in maps]
    col_labels = [f"head {h}" for h in maps[0].heads]
    x_labels = [[m.key_label] * len(m.heads) for m in maps]
    return save_grid(grid, path, row_labels, col_labels, title, x_labels)


class AttentionMaps(L.Callback):
    """Every ``every_n_val`` validations, render the attention maps of one fixed validation example.

    The example is row ``example_index`` of the first validation batch, taken once and kept, so every
    rendering shows the same input. Maps go to ``<out_dir>/step<global step>/maps.png`` (plus ``maps.npz``
    with ``save_arrays``) and, with a W&B logger, to the image key ``attention_maps``.

    Args:
        out_dir: where the step folders go (the config uses ``${paths.output_dir}/attention_maps``).
        every_n_val: render at every n-th validation run (sanity checks excluded).
        layers, heads: indices to render; None renders all.
        example_index: which row of the first validation batch.
        max_tokens: crop to the first real tokens, for readable images; None keeps all.
        save_arrays: also write the weights as ``maps.npz`` (``layer<i>``: ``[heads, queries, keys]``).
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
        self.layers = None if layers is None else list(layers)
        self.heads = None if heads is None else list(heads)
        self.example_index = example_index
        self.max_tokens = max_tokens
        self.save_arrays = save_arrays
        self.example: dict[str, Tensor] | None = None
        self.validations = 0
        self.last_maps: list[LayerMaps] = []
        self.written: list[Path] = []

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
        if self.validations % self.every_n_val:
            return
        self.render(pl_module, trainer.global_step, trainer.loggers)

    def render(self, pl_module: L.LightningModule, step: int, loggers: Sequence[Any] = ()) -> Path:
        """Render the kept example's maps for ``pl_module.model`` now; returns the PNG path."""
        if self.example is None:
            raise RuntimeError(
                "AttentionMaps.render: no example yet; it is taken from the first validation batch"
            )
        example = {key: value.to(pl_module.device) for key, value in self.example.items()}
        self.last_maps = example_maps(pl_module.model, example, self.layers, self.heads, self.max_tokens)
        step_dir = self.out_dir / f"step{step}"
        name = self.last_maps[0].attention
        label = int(self.example["label"][0]) if "label" in self.example else None
        title = f"{name} attention, validation example {self.example_index} (label {label}), step {step}"
        path = render_layer_maps(self.last_maps, step_dir / "maps.png", title)
        if self.save_arrays:
            np.savez_compressed(
                step_dir / "maps.npz", **{f"layer{m.layer}": m.weights for m in self.last_maps}
            )
        self.written.append(path)
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key="attention_maps", images=[str(path)], step=step, caption=[title])
        return path


# ---------------------------------------------------------------------------------------------------------
# Side by side from checkpoints


@dataclass
class LoadedRun:
    """A trained model rebuilt from its run directory."""

    name: str
    model: LRAModel
    config: Any
    summary: dict[str, Any]


def run_dir_of(checkpoint: Path) -> Path:
    """``<run>/checkpoints/last.ckpt`` → ``<run>``; a run directory is accepted as it is."""
    if checkpoint.is_dir():
        return checkpoint
    return checkpoint.parent.parent


def checkpoint_in(path: Path) -> Path:
    """A checkpoint file, or a run directory's ``checkpoints/last.ckpt``."""
    if path.is_file():
        return path
    candidate = path / "checkpoints" / "last.ckpt"
    if not candidate.is_file():
        raise MissingCheckpointError(f"no checkpoint at {path} (looked for {candidate}); pass a .ckpt file")
    return candidate


def model_from_config(config: Any, datamodule: Any) -> LRAModel:
    """The model train.py builds from this resolved config (``config_resolved.yaml``), at the current seed."""
    from hydra.utils import instantiate

    from lra.build import build_model

    return build_model(config.model, instantiate(config.attention), datamodule)


def run_files(path: Path) -> tuple[Path, Path, Any]:
    """The run directory, its checkpoint and its resolved config (``config_resolved.yaml``).

    Args:
        path: a checkpoint file or a run directory (whose ``checkpoints/last.ckpt`` is used).

    Raises:
        MissingCheckpointError: no checkpoint, or no ``config_resolved.yaml`` beside it.
    """
    from omegaconf import OmegaConf

    checkpoint = checkpoint_in(path)
    run_dir = run_dir_of(path if path.is_dir() else checkpoint)
    config_path = run_dir / "config_resolved.yaml"
    if not config_path.is_file():
        raise MissingCheckpointError(
            f"{config_path} not found; the checkpoint must sit in a train.py run directory "
            f"(<run>/checkpoints/*.ckpt next to <run>/config_resolved.yaml)"
        )
    return run_dir, checkpoint, OmegaConf.load(config_path)


def load_run(path: Path, datamodule: Any | None = None) -> tuple[LoadedRun, Any]:
    """Rebuild the model of a run from ``config_resolved.yaml`` and load the checkpoint's weights.

    Args:
        path: a checkpoint file or a run directory.
        datamodule: reuse this data module (its vocabulary and length define the model); None: the run's.

    Returns:
        The run and the data module used.
    """
    from hydra.utils import instantiate

    run_dir, checkpoint, config = run_files(path)
    if datamodule is None:
        datamodule = instantiate(config.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
    model = model_from_config(config, datamodule)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(
        {key[len("model.") :]: value for key, value in state.items() if key.startswith("model.")}
    )
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    name = summary.get("attention") or model.encoder.attentions[0].name
    return LoadedRun(name, model.eval(), config, summary), datamodule


def _comparable_data(first: Any, other: Any) -> bool:
    """Same task data, whatever the batch size or loader settings."""
    ignored = ("batch_size", "num_workers", "max_eval_samples")
    keep = [{k: v for k, v in dict(cfg).items() if k not in ignored} for cfg in (first, other)]
    return keep[0] == keep[1]


def example_from(datamodule: Any, split: str, index: int) -> dict[str, Tensor]:
    """Example ``index`` of a split (``val`` or ``test``), as a batch of size 1."""
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    dataset = loader.dataset
    if not 0 <= index < len(dataset):
        raise ConfigError(f"--example {index} is outside the {split} split ({len(dataset)} examples)")
    item = dataset[index]
    return {key: torch.as_tensor(value)[None] for key, value in item.items()}


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
    for path in paths[1:]:
        run, _ = load_run(path, datamodule)
        if not _comparable_data(first.config.data, run.config.data):
            raise ConfigError(
                f"{path} was trained on different data than {paths[0]} (its config's data section differs); "
                f"compare runs of the same task and sequence length"
            )
        runs.append(run)
    example = example_from(datamodule, split, index)
    per_run = [example_maps(run.model, example, layers, heads, max_tokens) for run in runs]
    grid, row_labels, x_labels = [], [], []
    for position, layer_maps in enumerate(per_run[0]):
        for head_position, head in enumerate(layer_maps.heads):
            grid.append([maps[position].weights[head_position] for maps in per_run])
            x_labels.append([maps[position].key_label for maps in per_run])
            row_labels.append(f"layer {layer_maps.layer}, head {head}")
    col_labels = []
    for run in runs:
        accuracy = run.summary.get("metrics", {}).get("test/acc")
        col_labels.append(run.name if accuracy is None else f"{run.name} (test acc {accuracy:.3f})")
    task = first.config.get("task", {}).get("name", "task")
    label = int(example["label"][0]) if "label" in example else None
    title = f"{task}: {split} example {index} (label {label}); each panel scaled 0 → its max"
    return save_grid(grid, out, row_labels, col_labels, title, x_labels)


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
