"""Attention factories straight from the registry (``conf/attention/<name>.yaml``), outside a Hydra run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from lra.errors import ConfigError
from lra.summary import REPO_ROOT
from models.attention.base import Attention

ATTENTION_DIR = REPO_ROOT / "conf" / "attention"


def registered_attentions() -> list[str]:
    """The names of ``conf/attention/*.yaml``."""
    return sorted(path.stem for path in ATTENTION_DIR.glob("*.yaml"))


def attention_factory(
    name: str, overrides: Mapping[str, Any] | None = None, attn_dropout: float = 0.0
) -> Callable[..., Attention]:
    """The YAML's partial with ``overrides`` merged in; call it with ``num_heads``, ``head_dim``, ``max_len``.

    ``${model.attn_dropout}`` in the YAML resolves to ``attn_dropout``.
    """
    path = ATTENTION_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown attention {name!r}: no {path}; registered: {registered_attentions()}")
    node = OmegaConf.merge(OmegaConf.load(path), dict(overrides or {}))
    root = OmegaConf.create({"model": {"attn_dropout": attn_dropout}, "attention": node})
    return instantiate(root.attention)
