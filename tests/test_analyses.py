"""Paper analyses: attention-weight maps, the maps callback and command, gradient-norm logging, TaylorShift's
normalisation switch, and the heads / gradients / ablation scripts in smoke mode."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import matplotlib.image
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lra import registry
from lra.analysis.grad_norms import AttentionGradNorms
from lra.analysis.maps import DPI, PANEL_INCHES, AttentionMaps, compare_checkpoints
from lra.module import LRAClassifier
from models.attention.maps import attention_weights, weights_output
from models.attention.taylorshift import (
    TaylorShiftAttention,
    taylorshift_attention,
    taylorshift_attention_ref,
)
from models.heads import LRAModel
from tests.helpers import ATTENTIONS, compose_config, listops_folder, saved_run, tiny_listops

PANEL_PX = int(PANEL_INCHES * DPI)
# Constructor overrides that fit the tiny shapes (Linformer's default 256 projected rows exceed them).
TINY_ATTENTION = {"linformer": {"proj_len": 6}}
VARIANTS = [(name, {}) for name in ATTENTIONS] + [
    ("taylorshift", {"mode": "efficient"}),
    ("taylorshift", {"normalize_input": False, "mode": "efficient"}),
    ("taylorshift", {"mask_padding": False}),
    ("taylorshift", {"causal": True, "output_norm": False}),
    ("fastmax", {"normalize": "none"}),
    ("performer", {"causal": True}),
    ("softmax", {"causal": True}),
]


def attention_factory(name: str, **overrides):
    return registry.attention_factory(name, {**TINY_ATTENTION.get(name, {}), **overrides})


def tiny_model(name: str, seq_len: int = 11) -> LRAModel:
    return LRAModel(
        attention_factory(name),
        vocab_size=12,
        seq_len=seq_len,
        num_classes=3,
        d_model=16,
        mlp_dim=16,
        n_layers=2,
        num_heads=2,
        qkv_dim=16,
        dropout=0.0,
    )


def padded_inputs(batch: int = 2, heads: int = 2, seq_len: int = 10, dim: int = 4):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        2 * torch.randn(batch, heads, seq_len, dim, generator=generator, dtype=torch.float64) for _ in "qkv"
    )
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[1, 7:] = False
    return q, k, v, mask


@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=lambda x: str(x))
def test_weights_rebuild_the_module_output(name, overrides):
    """weights @ v (with the module's output scale or value projection) is its forward, in float64."""
    module = attention_factory(name, **overrides)(num_heads=2, head_dim=4, max_len=12).double().eval()
    q, k, v, mask = padded_inputs()
    weights = attention_weights(module, q, k, mask)
    torch.testing.assert_close(
        weights_output(module, weights, v, mask), module(q, k, v, mask), rtol=1e-10, atol=1e-12
    )
    columns = 6 if name == "linformer" else 10
    assert weights.shape == (2, 2, 10, columns)
    assert weights.min() >= 0 and weights.max() <= 1
    real_rows = weights.sum(-1)[mask[:, None, :].expand(-1, 2, -1)]
    torch.testing.assert_close(real_rows, torch.ones_like(real_rows))
    assert (weights[1, :, 7:] == 0).all(), "rows at padded queries must be zero"
    if name != "linformer" and overrides.get("mask_padding", True):
        assert (weights[1, :, :, 7:] == 0).all(), "padded keys must get no weight"


@pytest.mark.parametrize("causal", [False, True])
def test_taylorshift_without_input_normalisation(causal):
    """normalize_input=False (logits q·k/√d, no d^(1/4), no 1/N_v): both modes equal the reference."""
    q, k, v, mask = padded_inputs(seq_len=12)
    tau = torch.full((2,), 1.5, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = taylorshift_attention_ref(*leaves, tau, mask, normalize_input=False, causal=causal)
    ref_grads = torch.autograd.grad(ref.sum(), leaves)
    for mode in ("direct", "efficient"):
        out = taylorshift_attention(*leaves, tau, mask, mode=mode, normalize_input=False, causal=causal)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        for grad, ref_grad in zip(torch.autograd.grad(out.sum(), leaves), ref_grads, strict=True):
            torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-11)
    # The logits are q·k/√d: unlike the normalised scheme, they change when q is scaled, and τ is unused.
    scaled = taylorshift_attention_ref(3 * q, k, v, tau, mask, normalize_input=False, causal=causal)
    assert (scaled - ref.detach()).abs().max() > 1e-3
    other_tau = taylorshift_attention_ref(q, k, v, 2 * tau, mask, normalize_input=False, causal=causal)
    torch.testing.assert_close(other_tau, ref.detach())
    module = TaylorShiftAttention(2, 4, 12, normalize_input=False, causal=causal).double()
    expected = taylorshift_attention_ref(
        q, k, v, torch.ones(2).double(), mask, normalize_input=False, causal=causal
    )
    # The module zeroes the output rows of padded queries; the reference leaves them.
    torch.testing.assert_close(module(q, k, v, mask), expected * mask[:, None, :, None])


def test_callback_configs_add_to_the_defaults():
    defaults = list(compose_config([]).callbacks)
    for choice, added in {
        "attention_maps": ["attention_maps"],
        "grad_norms": ["grad_norms"],
        "analyses": ["attention_maps", "grad_norms"],
    }.items():
        callbacks = compose_config([f"callbacks={choice}"]).callbacks
        assert list(callbacks) == defaults + added
    node = compose_config(["callbacks=analyses", "paths.output_dir=/tmp/x"]).callbacks
    assert isinstance(instantiate(node.attention_maps), AttentionMaps)
    assert isinstance(instantiate(node.grad_norms), AttentionGradNorms)


def tiny_batch(batch: int = 4, seq_len: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 12, (batch, seq_len), generator=generator)
    input_ids[0, 8:] = 0  # padding in the example the maps use
    return {
        "input_ids": input_ids,
        "mask": input_ids > 0,
        "label": torch.randint(0, 3, (batch,), generator=generator),
    }


@pytest.mark.parametrize("name", ATTENTIONS)
def test_maps_callback_renders_every_attention(name, tmp_path):
    callback = AttentionMaps(out_dir=str(tmp_path / "maps"), save_arrays=True)
    module = SimpleNamespace(model=tiny_model(name), device=torch.device("cpu"))
    callback.on_validation_batch_start(None, module, tiny_batch(), batch_idx=0)
    path = callback.render(module, step=7)
    assert path == tmp_path / "maps" / "step7" / "maps.png"
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (2 * PANEL_PX, 2 * PANEL_PX)  # 2 layers x 2 heads
    real_tokens = 9  # CLS + 8 real tokens of example 0
    columns = 6 if name == "linformer" else real_tokens
    arrays = np.load(path.with_name("maps.npz"))
    for layer_maps in callback.last_maps:
        weights = layer_maps.weights
        assert weights.shape == (2, real_tokens, columns)
        np.testing.assert_array_equal(arrays[f"layer{layer_maps.layer}"], weights)
        assert weights.min() >= 0 and weights.max() <= 1
        # Every registered attention is row-stochastic in its weights (TaylorShift's √(N_v/d) scales the
        # output, not the weights; Linformer's rows run over projected keys).
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


def fit_tiny(model: LRAModel, callbacks: list, tmp_path: Path, steps: int = 3, logger=False) -> L.Trainer:
    classifier = LRAClassifier(
        model,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        scheduler={"name": "constant", "warmup_steps": 0, "total_steps": steps},
        num_classes=3,
    )
    batches = [tiny_batch(seed=seed) for seed in range(steps)]
    rows = [{key: value[i] for key, value in batch.items()} for batch in batches for i in range(4)]
    loader = DataLoader(rows, batch_size=4)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=steps,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(classifier, train_dataloaders=loader, val_dataloaders=loader)
    return trainer


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_grad_norm_callback_logs_finite_norms(tmp_path):
    grad_norms = AttentionGradNorms(every_n_steps=2)
    maps = AttentionMaps(out_dir=str(tmp_path / "maps"))
    logger = CSVLogger(tmp_path, name="csv", version="")
    fit_tiny(tiny_model("taylorshift"), [grad_norms, maps], tmp_path, steps=3, logger=logger)
    assert [row["step"] for row in grad_norms.history] == [0.0, 2.0]
    expected = {f"layer{layer}/{name}" for layer in range(2) for name in "qkv"}
    for row in grad_norms.history:
        assert set(row) == expected | {"step"}
        assert all(np.isfinite(row[key]) and row[key] > 0 for key in expected)
    # Every logged step reaches the logger, although log_every_n_steps (50) is larger.
    from lra.analysis.runs import grad_series, read_metrics

    series = grad_series(read_metrics(tmp_path))
    assert set(series) == expected
    assert all([step for step, _ in points] == [0, 2] for points in series.values())
    assert (tmp_path / "maps" / "step3" / "maps.png").is_file()


def test_maps_command_from_checkpoints(tmp_path):
    """Two saved runs (as train.py lays them out) side by side on the same input."""
    data_dir = listops_folder(tmp_path)
    runs = []
    for name in ("softmax", "linformer"):
        overrides = tiny_listops(
            tmp_path, name, data_dir, *(["attention.proj_len=8"] if name == "linformer" else [])
        )
        runs.append(saved_run(tmp_path / name, overrides) / "checkpoints" / "last.ckpt")
    out = compare_checkpoints(runs, tmp_path / "side_by_side.png", heads=[0, 1], max_tokens=12)
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (2 * PANEL_PX, 2 * PANEL_PX)  # rows: (layer 0, head 0/1); columns: 2 runs


def test_heads_analysis_smoke(tmp_path):
    from lra.analysis import heads

    argv = ["--smoke", "--attentions", "taylorshift", "--seq-lens", "16", "32", "--repeats", "1"]
    report = heads.main([*argv, "--out", str(tmp_path), "--label", "smoke"])
    text = report.read_text()
    assert "N0 = d²+d+1" in text and "| 2 | 8 |" in text and "| 4 | 4 |" in text
    assert (tmp_path / "heads_smoke.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "heads_smoke.jsonl").read_text().splitlines()]
    measured = [row for row in rows if row["kind"] == "operator" and row.get("fwd_bwd_ms")]
    assert {(row["heads"], row["head_dim"]) for row in measured} == {(2, 8), (4, 4)}
    assert {row["label"] for row in measured} >= {heads.DIRECT, heads.EFFICIENT}
    assert all(row["gate_ok"] is not False for row in measured)


def test_gradient_scale_sweep_and_report(tmp_path):
    """Normalised logits make the q/k gradients fall as 1/s; softmax saturates; the CSV report reads runs."""
    from lra.analysis import gradients

    rows = gradients.operator_scale_sweep(scales=(1.0, 100.0), heads=1, seq_len=16, head_dim=4)
    norm = {(row["attention"], row["scale"]): row["q"] for row in rows}
    for name in ("taylorshift", "fastmax"):
        assert norm[(name, 100.0)] == pytest.approx(norm[(name, 1.0)] / 100, rel=1e-6)
    assert norm[("softmax", 100.0)] < 1e-3 * norm[("softmax", 1.0)]
    run = tmp_path / "run" / "csv"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text(
        "grad_norm/layer0/k,grad_norm/layer0/q,grad_norm/layer0/v,step,train/loss\n"
        "0.5,0.25,1.0,0,2.3\n,,,1,2.2\n0.4,inf,0.9,2,2.1\n"
    )
    table = gradients.training_table({"softmax": tmp_path / "run"})
    assert "| softmax | layer0/q | 0.25 | 0.25 | 0.25 | 1 | inf | 2 (1 non-finite) |" in table
    assert gradients.plot_training({"softmax": tmp_path / "run"}, tmp_path / "g.png").is_file()


def test_ablation_operator_shows_what_the_normalisation_prevents():
    """fp16 states: unnormalised TaylorShift/Fastmax overflow at s = 16; the modules (fp32 states) do not."""
    from lra.analysis import ablation

    rows = ablation.operator_rows(seq_lens=(64,), scales=(16.0,), head_dim=8)
    by = {(row["scheme"], row["dtype"]): row for row in rows}
    for scheme in ("taylorshift-off", "fastmax-none"):
        assert by[(scheme, "float16")]["emulated_nonfinite"] > 0
        assert by[(scheme, "float16")]["module_nonfinite"] == 0
    for scheme in ("taylorshift", "fastmax"):
        assert by[(scheme, "float16")]["emulated_nonfinite"] == 0
        assert by[(scheme, "float16")]["emulated_max_rel_error"] < 0.01
    assert "**" in ablation.operator_table(rows)
