"""The attention registry: ``conf/attention/<name>.yaml`` builds an attention, ``results/published.yaml``
gives its place in tables and its published LRA numbers. Everything that lists or builds attentions goes
through here, so a new YAML is picked up everywhere."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from lra.errors import ConfigError
from lra.summary import REPO_ROOT
from models.attention.base import Attention

ATTENTION_DIR = REPO_ROOT / "conf" / "attention"
PUBLISHED_FILE = REPO_ROOT / "results" / "published.yaml"


@functools.cache
def _published() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(PUBLISHED_FILE))


def published_source() -> str:
    return _published()["source"]


def attention_rank(name: str) -> int:
    """Position in tables: the order of results/published.yaml; unlisted attentions after it."""
    order = list(_published()["attentions"])
    return order.index(name) if name in order else len(order)


def ordered(names: Iterable[str]) -> list[str]:
    """``names`` without repeats, in table order (unlisted ones alphabetically after the listed ones)."""
    return sorted(set(names), key=lambda name: (attention_rank(name), name))


def registered_attentions(only: Iterable[str] | None = None) -> list[str]:
    """The names of ``conf/attention/*.yaml`` in table order, optionally restricted to ``only``."""
    names = ordered(path.stem for path in ATTENTION_DIR.glob("*.yaml"))
    if only is None:
        return names
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ConfigError(f"unknown attention(s) {unknown}: not in {ATTENTION_DIR}; registered: {names}")
    return [name for name in names if name in set(only)]


def published_accuracy(attention: str, task: str) -> float | str:
    """The published test accuracy (%) for this pair, "FAIL", or why there is none."""
    numbers = _published()["attentions"].get(attention) or {}
    if task not in numbers:
        return "n/a (not in Table 1)" if attention in _published()["attentions"] else "n/a"
    return "FAIL" if numbers[task] is None else float(numbers[task])


def published_efficiency_4k(attention: str) -> tuple[float, float] | None:
    """LRA Table 3 at 4K tokens: (speed-up, peak memory ÷ the Transformer's), or None if not published."""
    table = _published()["efficiency_4k"]
    if (numbers := table["attentions"].get(attention)) is None:
        return None
    return numbers["speedup"], numbers["memory_gb"] / table["softmax_memory_gb"]


def attention_factory(
    name: str, overrides: Mapping[str, Any] | None = None, attn_dropout: float = 0.0
) -> Callable[..., Attention]:
    """The YAML's partial with ``overrides`` merged in, ``${attn_dropout}`` resolved to
    ``attn_dropout``; call it with ``num_heads``, ``head_dim``, ``max_len``."""
    path = ATTENTION_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown attention {name!r}: no {path}; registered: {registered_attentions()}")
    node = OmegaConf.merge(OmegaConf.load(path), dict(overrides or {}))
    root = OmegaConf.create({"attn_dropout": attn_dropout, "attention": node})
    return instantiate(root.attention)
