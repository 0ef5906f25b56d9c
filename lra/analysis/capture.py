"""Forward pre-hooks that see what each encoder layer passes to its attention module."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch.utils.hooks import RemovableHandle

from models.encoder import LRAEncoder


def add_attention_pre_hooks(encoder: LRAEncoder, callback: Callable[..., object]) -> list[RemovableHandle]:
    """Call ``callback(layer, module, q, k, v, mask)`` before every attention call of ``encoder``
    (``[B, H, N, d]`` and ``[B, N]`` or None); returns the handles."""

    def hook(layer: int, module: object, args: tuple, kwargs: dict) -> None:
        # Returns None whatever the callback returns: a pre-hook's result would replace the inputs.
        callback(layer, module, *args, **kwargs)

    return [
        module.register_forward_pre_hook(partial(hook, layer), with_kwargs=True)
        for layer, module in enumerate(encoder.attentions)
    ]
