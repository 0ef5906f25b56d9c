"""Explicit attention-weight matrices, for looking at what a trained attention does (attention maps).

``attention_weights(module, q, k, mask)`` returns the weights the module's forward applies to its values, from
the module's own state (τ, random features, E, normalisation settings), through the ``Attention`` methods
``explicit_weights`` and ``apply_weights``. For the linear-time methods this is their quadratic form, meant
for one example at a time, never for training. Most attentions get it from their ``reference`` applied to
V = I; the columns index keys, or what ``module.key_axis`` says (Linformer: the k projected keys E·K).

``weights_output`` applies the weights to values exactly as the module does, so tests check
``weights_output(module, attention_weights(module, q, k, mask), v, mask) == module(q, k, v, mask)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.attention.base import Attention, accumulation_dtype, zero_pads


def attention_weights(module: Attention, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """The weights ``module`` applies to its values, in eval behaviour (no dropout, no redraw).

    Args:
        module: an attention module (its learned and random state is used as it is).
        q, k: ``[B, H, N, d]``, the tensors the encoder passes to the module.
        mask: ``[B, N]`` bool, True at real tokens.

    Returns:
        ``[B, H, N, M]`` (M = N, or Linformer's k projected keys), fp32 (fp64 for fp64 inputs). Rows at
        padded queries are zero, as the module's output rows are; columns at padded keys are zero unless the
        module attends to pads (``module.key_mask(mask)`` is None).
    """
    module.check_inputs(q, k, k, mask)
    acc = accumulation_dtype(q.dtype)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        q, k = q.to(acc), k.to(acc)
        key_mask = module.key_mask(mask)
        if key_mask is not None:
            # The module's forward zeroes q, k at pads before attend; statistics such as Fastmax's max-norm
            # and Performer's key stabiliser see those zeros.
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
