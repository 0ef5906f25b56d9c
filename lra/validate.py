"""Checks of the composed config before any data is loaded, so impossible runs fail in seconds.

The attention is built exactly as the encoder will build it and run once on a tiny masked batch on the
training device and precision: the mechanisms validate their own options at construction, and the forward
pass catches what only the device knows (an SDPA backend pinned to a kernel this device lacks).
"""

from __future__ import annotations

import contextlib

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lra.errors import ConfigError
from lra.schedules import lr_multiplier

EVAL_CHECKPOINTS = ("last", "best_val")
PROBE_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}

__all__ = ["ConfigError", "check_attention", "validate_config"]


def check_attention(cfg: DictConfig) -> str | None:
    """The problem found building one attention layer as the encoder will and running it once, or None."""
    heads, width = cfg.model.num_heads, cfg.model.qkv_dim
    max_len = cfg.data.seq_len + int(cfg.model.pooling == "cls")
    where = (
        f"attention={cfg.attention._target_.rsplit('.', 1)[-1]} with num_heads={heads}, "
        f"head_dim={width // heads}, max_len={max_len} (data.seq_len={cfg.data.seq_len}"
        f"{' + 1 CLS' if cfg.model.pooling == 'cls' else ''})"
    )
    cpu = str(cfg.trainer.accelerator) == "cpu" or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    precision = str(cfg.trainer.precision)
    dtype = next((d for prefix, d in PROBE_DTYPES.items() if precision.startswith(prefix)), torch.float32)
    mixed = precision.endswith("-mixed")
    autocast = torch.autocast(device.type, dtype=dtype) if mixed else contextlib.nullcontext()
    # The probe must not move the run's random streams (Performer draws its features at construction).
    with torch.random.fork_rng(devices=[] if cpu else [device]):
        try:
            layer = instantiate(cfg.attention)(num_heads=heads, head_dim=width // heads, max_len=max_len)
        except (ValueError, TypeError) as error:
            return f"{where}: {error}; change the attention.* key it names (or the model/data sizes)"
        length = min(max_len, 64)
        q, k, v = torch.randn(3, 1, heads, length, width // heads, device=device, dtype=dtype).unbind(0)
        mask = torch.ones(1, length, dtype=torch.bool, device=device)
        if length > 1:
            mask[:, -1] = False
        try:
            with torch.no_grad(), autocast:
                layer.to(device).eval()(q, k, v, mask)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            return (
                f"{where} cannot run on {device.type} with trainer.precision={precision}: {error}; choose an "
                f"option this device supports (see conf/attention/*.yaml)"
            )
    return None


def validate_config(cfg: DictConfig) -> list[str]:
    """Check ``cfg`` before any data is loaded; returns warnings, raises :class:`ConfigError` on problems."""
    problems, warnings = [], []
    if cfg.eval.checkpoint not in EVAL_CHECKPOINTS:
        problems.append(f"eval.checkpoint={cfg.eval.checkpoint!r} is not one of {EVAL_CHECKPOINTS}")
    heads, width = cfg.model.num_heads, cfg.model.qkv_dim
    if heads < 1 or width % heads:
        near = min((d for d in range(1, width + 1) if width % d == 0), key=lambda d: abs(d - int(heads or 1)))
        problems.append(
            f"model.qkv_dim={width} is not divisible by model.num_heads={heads} (each head gets qkv_dim / "
            f"num_heads features); change one of them, e.g. model.num_heads={near}"
        )
    if cfg.data.seq_len < 1 or cfg.data.batch_size < 1:
        problems.append(
            f"data.seq_len={cfg.data.seq_len} and data.batch_size={cfg.data.batch_size} must be >= 1"
        )
    allowed = cfg.trainer.get("max_nonfinite_steps", 0)
    if not isinstance(allowed, int) or allowed < 0:
        problems.append(f"trainer.max_nonfinite_steps={allowed!r} must be an integer >= 0")
    try:
        lr_multiplier(**cfg.scheduler)
    except (ValueError, TypeError) as error:
        problems.append(f"scheduler: {error}")
    if not problems and (problem := check_attention(cfg)):
        problems.append(problem)
    if cfg.eval.checkpoint == "best_val" and cfg.data.get("val_split") == "test":
        warnings.append(
            "eval.checkpoint=best_val with data.val_split=test selects the checkpoint on the test set, which "
            "inflates test/acc; use data.val_split=train_holdout for an honest best-val selection"
        )
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return warnings
