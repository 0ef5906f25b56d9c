"""Forward pre-hooks that capture what each encoder layer passes to its attention module."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import Tensor
from torch.utils.hooks import RemovableHandle

from models.attention.base import Attention
from models.encoder import LRAEncoder


@dataclass
class AttentionCall:
    """The arguments of one ``Attention.forward(q, k, v, mask)`` call: ``[B, H, N, d]`` and ``[B, N]``."""

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None = None


def add_attention_pre_hooks(
    encoder: LRAEncoder, callback: Callable[[int, Attention, AttentionCall], None]
) -> list[RemovableHandle]:
    """Call ``callback(layer, module, call)`` before every attention call of ``encoder``; returns handles."""

    def hook(layer: int, module: Attention, args: tuple, kwargs: dict) -> None:
        callback(layer, module, AttentionCall(*args, **kwargs))

    return [
        module.register_forward_pre_hook(partial(hook, layer), with_kwargs=True)
        for layer, module in enumerate(encoder.attentions)
    ]
