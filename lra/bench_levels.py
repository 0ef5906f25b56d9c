"""The benchmark's two levels (run by ``lra/bench.py``): the attention module alone on N(0, 1) q, k, v
(operator), and one training step of a whole LRA model (model: the speed/memory comparison of Tay et al.
2021, arXiv 2011.04006, Table 2). Both time with ``lra.timing.measure`` and hand every point to
``Sweep.point``, which turns whatever happens (measured, skipped, out of memory, failed) into its row."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from lra.errors import ConfigError
from lra.registry import ATTENTION_DIR, attention_factory, registered_attentions
from lra.timing import Sweep, measure, release_memory
from models.attention.base import Attention


@dataclass(frozen=True)
class Variant:
    """A registered attention with constructor ``overrides`` merged over its YAML. ``quadratic``: it
    materialises N×N, so it runs only up to ``max_n_quadratic``; ``compile``: time ``torch.compile(module)``
    (compiled during the warm-up)."""

    attention: str
    overrides: dict[str, Any] = field(default_factory=dict)
    quadratic: bool = False
    compile: bool = False

    @property
    def variant(self) -> str:
        parts = [f"{key}={value}" for key, value in self.overrides.items()]
        return ",".join(parts + (["compile"] if self.compile else [])) or "default"

    @property
    def label(self) -> str:
        return self.attention if self.variant == "default" else f"{self.attention} {self.variant}"

    def row_fields(self) -> dict[str, Any]:
        return {
            name: getattr(self, name) for name in ("attention", "variant", "label", "overrides", "compile")
        }


def variants_from_config(variants_cfg: Any, attentions: list[str]) -> list[Variant]:
    """Expand ``{attention: [overrides, ...]}``; an attention without an entry runs its YAML as it is."""
    if isinstance(variants_cfg, DictConfig):
        variants_cfg = OmegaConf.to_container(variants_cfg, resolve=True)
    by_attention = dict(variants_cfg or {})
    unknown = sorted(set(by_attention) - set(registered_attentions()))
    if unknown:
        raise ConfigError(
            f"bench.variants names attentions {unknown} that have no conf/attention/<name>.yaml"
        )
    result = []
    for name in attentions:
        for entry in by_attention.get(name) or [{}]:
            entry = dict(entry or {})
            flags = {key: bool(entry.pop(key, False)) for key in ("quadratic", "compile")}
            result.append(Variant(name, entry, **flags))
    return result


def attention_values(values: dict[str, Any]) -> dict[str, Any]:
    """An attention's ``log_values()`` as row fields: plain numbers, without the per-head temperatures."""
    return {
        key: (value.item() if isinstance(value, Tensor) else value)
        for key, value in values.items()
        if not key.startswith("tau_")
    }


def _gflops(flops: float | None, ms: float | None) -> float | None:
    return None if not flops or not ms else flops / (ms * 1e6)


def _relative_error(x: Tensor, reference: Tensor) -> float:
    reference = reference.double()
    return float((x.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


@dataclass
class Shape:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool
    masked: bool


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Fresh N(0, 1) q, k, v (leaves that require grad), dO, and the mask (the last N/8 tokens padded)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    size = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
    q, k, v, dout = (torch.randn(size, generator=generator).to(device=device, dtype=dtype) for _ in range(4))
    mask = None
    if shape.masked:
        real = shape.seq_len - shape.seq_len // 8
        mask = (torch.arange(shape.seq_len) < real).expand(shape.batch, -1).to(device)
    return dict(q=q.requires_grad_(), k=k.requires_grad_(), v=v.requires_grad_(), dout=dout, mask=mask)


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
    # A fresh compile per shape: graphs cached for other shapes would hit the recompile limit and silently
    # fall back to eager.
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
    """The operator level: every variant on every shape of the grid, interleaved per shape. Forward (no
    grad) and forward + backward (random dO) times; peak memory of fwd+bwd above the inputs; a correctness
    gate against the attention's first variant run in fp32."""

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
        self.sweep = Sweep(device, self.grid.point_budget_s, timed_key="fwd_bwd_ms")
        self.gate_reference: dict[str, dict[str, Tensor] | None] = {}

    def rows(self) -> Iterator[dict[str, Any]]:
        grid = self.grid
        axes = (grid.head_dim, sorted(grid.seq_len), grid.batch, grid.heads, grid.causal, grid.masked)
        for head_dim, seq_len, batch, heads, causal, masked in itertools.product(*axes):
            shape = Shape(batch, heads, seq_len, head_dim, causal, masked)
            inputs = make_inputs(shape, self.device, self.dtype, self.cfg.seed)
            row = {
                "kind": "operator",
                **self.env,
                "dtype": str(self.dtype).removeprefix("torch."),
                **vars(shape),
                "sdpa_default": self._sdpa_default(inputs, shape),
            }
            self.gate_reference = {}
            for variant in self.variants:
                yield self.sweep.point(
                    {**row, **variant.row_fields(), "quadratic": variant.quadratic},
                    (variant.label, batch, heads, head_dim, causal, masked),  # a line of a plot
                    seq_len,
                    partial(self._measure, variant, shape, inputs),
                    skip=self._skip_reason(variant, shape),
                )
            del inputs
            release_memory(self.device)

    def _sdpa_default(self, inputs: dict[str, Any], shape: Shape) -> str:
        from models.attention.softmax import probe_dispatched_backend

        try:
            return probe_dispatched_backend(
                inputs["q"], inputs["k"], inputs["v"], inputs["mask"], shape.causal
            )
        except RuntimeError as error:
            return f"none ({str(error).splitlines()[0][:80]})"

    def _skip_reason(self, variant: Variant, shape: Shape) -> str | None:
        if variant.quadratic and shape.seq_len > self.grid.max_n_quadratic:
            return f"materialises N×N: N > max_n_quadratic={self.grid.max_n_quadratic}"
        yaml = ATTENTION_DIR / f"{variant.attention}.yaml"
        if shape.causal and not get_class(str(OmegaConf.load(yaml)["_target_"])).supports_causal:
            return "not causal"
        return None

    def _measure(self, variant: Variant, shape: Shape, inputs: dict[str, Any]) -> dict[str, Any]:
        grid, device = self.grid, self.device
        try:
            module, call = build_operator(
                variant, shape, device, self.dtype, self.cfg.seed, self.cfg.attn_dropout
            )
            out, peak_mb, fb_ms, fb_iqr = measure(
                lambda: _fwd_bwd(call, module, inputs), device, grid.warmup, grid.repeats
            )
            gate = self._gate(variant, shape, out, inputs)
            _, _, fwd_ms, fwd_iqr = measure(
                lambda: _fwd(call, inputs), device, grid.warmup, grid.repeats, memory=False
            )
        finally:
            for name in "qkv":
                inputs[name].grad = None
        flops = float(module.flops(shape.batch, shape.heads, shape.seq_len, shape.head_dim))
        factors = self.cfg.fwd_bwd_flop_factor
        fb_flops = flops * float(factors.get(variant.attention, factors.default))
        softmax_flops = 4.0 * shape.batch * shape.heads * shape.seq_len**2 * shape.head_dim
        values = attention_values(module.log_values())
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
            **{key: values.get(key) for key in ("backend", "backend_dispatched", "mode_used", "impl_used")},
            **gate,
        }
        if self.matmul_gflops:
            row["fwd_pct_of_matmul"] = 100 * row["fwd_gflops"] / self.matmul_gflops
        return row

    def _gate(self, variant: Variant, shape: Shape, out: Tensor, inputs: dict[str, Any]) -> dict[str, Any]:
        """Output and q/k/v gradients against the attention's first variant run in fp32."""
        if shape.seq_len > self.grid.gate_max_n:
            return {"gate_err": None, "gate_ok": None}
        first = next(v for v in self.variants if v.attention == variant.attention)
        if variant.attention not in self.gate_reference:
            reference = self._fp32_reference(replace(first, compile=False), shape, inputs)
            self.gate_reference[variant.attention] = reference
        reference = self.gate_reference[variant.attention]
        if reference is None:
            return {"gate_err": None, "gate_ok": None}
        ours = {"out": out.detach(), **{name: inputs[name].grad for name in "qkv"}}
        err = max(_relative_error(ours[name], reference[name]) for name in reference)
        tolerance = float(self.grid.gate_tol[str(self.dtype).removeprefix("torch.")])
        return {"gate_err": err, "gate_ok": err <= tolerance, "gate_against": first.variant}

    def _fp32_reference(self, first: Variant, shape: Shape, inputs: dict[str, Any]) -> dict | None:
        try:
            module, call = build_operator(first, shape, self.device, torch.float32, self.cfg.seed)
            leaves = {name: inputs[name].detach().float().requires_grad_() for name in "qkv"}
            out = _fwd_bwd(call, module, {**leaves, "dout": inputs["dout"].float(), "mask": inputs["mask"]})
            return {"out": out.detach(), **{name: leaves[name].grad for name in "qkv"}}
        except Exception:  # noqa: BLE001 - no reference (e.g. a pinned backend without fp32): no gate
            return None


class ModelBench:
    """The model level: one LRA model per attention variant, one training step (forward, backward,
    optimiser step) at each sequence length: steps/s and peak memory."""

    def __init__(
        self, cfg: DictConfig, variants: list[Variant], device: torch.device, env: dict[str, Any]
    ) -> None:
        self.cfg, self.level = cfg, cfg.bench.model_level
        self.variants, self.device, self.env = variants, device, env
        self.sweep = Sweep(device, self.level.point_budget_s, timed_key="step_ms")

    @cached_property
    def _task_cfg(self) -> DictConfig:
        """conf/config.yaml as train.py would see it for this task and batch size."""
        from hydra import compose

        level = self.level
        overrides = [f"task={level.task}", f"profile={level.profile}", f"data.batch_size={level.batch_size}"]
        return compose(config_name="config", overrides=[*overrides, *level.overrides])

    def rows(self) -> Iterator[dict[str, Any]]:
        level = self.level
        for seq_len in sorted(level.seq_len):
            for variant in self.variants:
                row = {
                    "kind": "model",
                    **self.env,
                    "task": level.task,
                    "profile": level.profile,
                    **variant.row_fields(),
                    "seq_len": seq_len,
                    "batch": level.batch_size,
                    "precision": str(level.precision),
                }
                yield self.sweep.point(
                    row, (variant.label,), seq_len, partial(self._measure, variant, seq_len)
                )

    def _measure(self, variant: Variant, seq_len: int) -> dict[str, Any]:
        from lra.build import build_model

        # The task config at this length, its attention node swapped as ``attention=<name>`` would.
        cfg = self._task_cfg.copy()
        cfg.data.seq_len = seq_len
        cfg.attention = OmegaConf.merge(
            OmegaConf.load(ATTENTION_DIR / f"{variant.attention}.yaml"), variant.overrides
        )
        data_class = get_class(cfg.data._target_)
        if data_class.dual:
            raise ConfigError(f"the model level times single-document tasks; {self.level.task} is dual")
        # What build_model reads from a data module, without loading any data.
        datamodule = SimpleNamespace(
            vocab_size=data_class.vocab_size, num_classes=data_class.num_classes, dual=False, seq_len=seq_len
        )
        torch.manual_seed(self.cfg.seed)
        model = build_model(cfg.model, instantiate(cfg.attention), datamodule).to(self.device).train()
        encoder = model.encoder
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

        _, peak_mb, step_ms, step_iqr = measure(step, self.device, self.level.warmup, self.level.repeats)
        values = attention_values(encoder.attentions[0].log_values())
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
            "values": values,
            **{key: values.get(key) for key in ("mode_used", "impl_used", "backend_dispatched")},
        }
