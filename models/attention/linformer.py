"""Linformer attention: keys and values projected along the sequence to a fixed length (Wang et al., 2020,
arXiv 2006.04768)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention.base import Attention, require, require_choice, require_probability, zero_pads


def _check_length(seq_len: int, e_proj: Tensor) -> None:
    if seq_len > e_proj.shape[1]:
        raise ValueError(
            f"linformer: sequence length {seq_len} exceeds the projection's max_len={e_proj.shape[1]}; "
            f"raise max_len or truncate the input"
        )


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    e_proj: Tensor,
    f_proj: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """softmax(Q (E·K)ᵀ/√d)(F·V) in O(N·k·d) with E, F ``[k, N_max]`` shared by the heads.

    An input shorter than N_max stands for one right-padded with zero rows, which add nothing to E·K, so only
    the first N columns of E and F are used.
    """
    seq_len = q.shape[2]
    _check_length(seq_len, e_proj)
    if mask is not None:  # the projection mixes every position into every projected row
        k, v = zero_pads((k, v), mask)
    keys = e_proj[:, :seq_len].to(k.dtype) @ k  # [B, H, k, D]
    values = f_proj[:, :seq_len].to(v.dtype) @ v  # [B, H, k, D]
    return F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout_p)


def linformer_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, e_proj: Tensor, f_proj: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Explicit right-padding to N_max, explicit E·K and F·V, then softmax with an explicit [N, k] matrix."""
    seq_len, max_len = q.shape[2], e_proj.shape[1]
    _check_length(seq_len, e_proj)
    if mask is not None:  # the projection mixes every position into every projected row
        k, v = zero_pads((k, v), mask)
    padding = (0, 0, 0, max_len - seq_len)
    keys = torch.einsum("kn,bhnd->bhkd", e_proj.to(k.dtype), F.pad(k, padding))
    values = torch.einsum("kn,bhnd->bhkd", f_proj.to(v.dtype), F.pad(v, padding))
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, N, k]
    return torch.softmax(scores, dim=-1) @ values


class LinformerAttention(Attention):
    """Low-rank attention with learned sequence projections (Wang et al., "Linformer", 2020).

    ``proj_len`` k ≤ max_len. ``share``: ``headwise`` (one E and one F per layer) or ``kv`` (E = F); the
    paper's ``layerwise`` sharing needs state shared between layers, which the per-layer factory cannot
    express. ``dropout`` acts on the weights in training.
    """

    supports_causal = False
    needs_seq_len = True
    key_axis = "projected key (E·K)"

    def __init__(
        self, *args: Any, proj_len: int = 256, share: str = "headwise", dropout: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        require_choice("linformer", "share", share, ("headwise", "kv"))
        require(
            1 <= proj_len <= self.max_len,
            f"linformer: proj_len must lie in [1, max_len={self.max_len}], got {proj_len}; "
            f"lower attention.proj_len for this task",
        )
        require_probability("linformer", "dropout (the task's attn_dropout unless set)", dropout)
        self.proj_len, self.share, self.dropout = proj_len, share, dropout
        bound = 1.0 / math.sqrt(proj_len)
        self.e_proj = nn.Parameter(torch.empty(proj_len, self.max_len).uniform_(-bound, bound))
        # share='kv': F = E, no second parameter.
        self.f_proj = (
            None if share == "kv" else nn.Parameter(torch.empty_like(self.e_proj).uniform_(-bound, bound))
        )

    @property
    def value_proj(self) -> Tensor:
        return self.e_proj if self.f_proj is None else self.f_proj

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        dropout_p = self.dropout if self.training else 0.0
        return linformer_attention(q, k, v, self.e_proj, self.value_proj, mask, dropout_p)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return linformer_attention_ref(q, k, v, self.e_proj, self.value_proj, mask)

    def explicit_weights(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        """``[B, H, N, k]`` over the projected keys E·K: no token-to-token matrix exists."""
        keys = self.e_proj[:, : q.shape[2]].to(q.dtype) @ k  # pads of k are already zero
        return torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)

    def apply_weights(self, weights: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return weights @ (self.value_proj[:, : v.shape[2]].to(v.dtype) @ v)

    def flops(self, batch: int, heads: int, seq_len: int, head_dim: int) -> float:
        return 8.0 * batch * heads * seq_len * self.proj_len * head_dim

    def log_values(self) -> dict[str, Any]:
        return {"proj_len": self.proj_len, "share": self.share}
