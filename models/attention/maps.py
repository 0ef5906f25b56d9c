"""Explicit attention-weight matrices (attention maps), from a module's own state (τ, random features, E,
normalisation) through ``Attention.explicit_weights``: for the linear-time methods their quadratic form, for
one example at a time. ``weights_output(m, attention_weights(m, q, k, mask), v, mask) == m(q, k, v, mask)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.attention.base import Attention, accumulation_dtype, zero_pads


def attention_weights(module: Attention, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[B, H, N, M]`` (M = N, or Linformer's projected keys) in fp32 (fp64 for fp64 inputs), in eval
    behaviour. Rows at padded queries are zero, and so are columns at padded keys unless the module attends
    to pads (``module.key_mask(mask)`` is None)."""
    module.check_inputs(q, k, k, mask)
    acc = accumulation_dtype(q.dtype)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        q, k = q.to(acc), k.to(acc)
        key_mask = module.key_mask(mask)
        if key_mask is not None:
            # As in forward: statistics such as Fastmax's max-norm see the zeroed pads.
            q, k = zero_pads((q, k), key_mask)
        weights = module.explicit_weights(q, k, key_mask)
        if mask is not None:
            (weights,) = zero_pads((weights,), mask)
    return weights


def key_axis_label(module: Attention) -> str:
    """What the columns of ``attention_weights`` index: ``key`` or, for Linformer, ``projected key (E·K)``."""
    return module.key_axis


def weights_output(module: Attention, weights: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[B, H, N, d]``: the output rebuilt from the weights (v zeroed at pads, as the forward does)."""
    v = v.to(weights.dtype)
    key_mask = module.key_mask(mask)
    if key_mask is not None:
        (v,) = zero_pads((v,), key_mask)
    return module.apply_weights(weights, v, key_mask)
