"""The LRA Transformer encoder (the LRA paper's "Transformer" baseline) with a pluggable attention.

Token embedding (N(0, 1), no √d scaling, as the official code), an optional zero-initialised CLS vector,
sinusoidal or learned positions, dropout, pre-LN blocks ``x + Drop(Attn(LN(x)))`` and ``x + MLP(LN(x))``, a
final LayerNorm, then pooling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from einops import rearrange
from torch import Tensor, nn

from models.attention.base import Attention

POOLINGS = ("cls", "mean", "first_token")
POS_EMBS = ("sinusoidal", "learned")
PAD_MASKS = ("token_nonzero", "length", "none")
MEAN_POOLS = ("all_positions", "valid_only")


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """The Transformer's sin/cos table, ``[length, dim]``."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10_000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class EncoderBlock(nn.Module):
    """Pre-LN Transformer block; the q/k/v/out projections are the same for every attention."""

    def __init__(
        self, d_model: int, num_heads: int, qkv_dim: int, mlp_dim: int, dropout: float, attention: Attention
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * qkv_dim, bias=False)
        self.out = nn.Linear(qkv_dim, d_model, bias=False)
        self.attention = attention
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, d_model),
            nn.Dropout(dropout),
        )
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = rearrange(
            self.qkv(self.norm_attn(x)), "b n (three h d) -> three b h n d", three=3, h=self.num_heads
        )
        attended = rearrange(self.attention(q, k, v, mask), "b h n d -> b n (h d)")
        x = x + self.dropout(self.out(attended))
        return x + self.mlp(self.norm_mlp(x))


class LRAEncoder(nn.Module):
    """Embeds token ids (0 is padding) and returns one pooled vector per sequence.

    ``attention`` is a factory completed with ``num_heads``, ``head_dim`` and ``max_len`` (``seq_len``, + 1
    with a CLS token). ``pos_emb``: ``sinusoidal`` or ``learned`` (N(0, 0.02)). ``pad_mask``:
    ``token_nonzero`` (official: id 0 is padding, so black pixels are masked, and CLS copies the first
    token's mask), ``length`` (only true padding) or ``none``. ``mean_pool``: ``all_positions`` (official,
    padding included) or ``valid_only``.
    """

    def __init__(
        self,
        attention: Callable[..., Attention],
        vocab_size: int,
        seq_len: int,
        d_model: int,
        n_layers: int,
        num_heads: int,
        qkv_dim: int,
        mlp_dim: int,
        dropout: float = 0.1,
        pooling: str = "cls",
        pos_emb: str = "sinusoidal",
        pad_mask: str = "token_nonzero",
        mean_pool: str = "all_positions",
    ) -> None:
        super().__init__()
        for key, value, choices in (
            ("pooling", pooling, POOLINGS),
            ("pos_emb", pos_emb, POS_EMBS),
            ("pad_mask", pad_mask, PAD_MASKS),
            ("mean_pool", mean_pool, MEAN_POOLS),
        ):
            if value not in choices:
                raise ValueError(f"model.{key}={value!r} is not one of {choices}")
        if qkv_dim % num_heads:
            raise ValueError(f"model.qkv_dim={qkv_dim} is not divisible by model.num_heads={num_heads}")
        self.pooling, self.pad_mask, self.mean_pool = pooling, pad_mask, mean_pool
        self.use_cls = pooling == "cls"
        self.max_len = max_len = seq_len + int(self.use_cls)
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if self.use_cls else None
        if pos_emb == "learned":
            self.positions = nn.Parameter(torch.randn(1, max_len, d_model) * 0.02)
        else:
            self.register_buffer("positions", sinusoidal_positions(max_len, d_model)[None], persistent=False)
        self.dropout = nn.Dropout(dropout)
        make_attention = partial(
            attention, num_heads=num_heads, head_dim=qkv_dim // num_heads, max_len=max_len
        )
        self.blocks = nn.ModuleList(
            EncoderBlock(d_model, num_heads, qkv_dim, mlp_dim, dropout, make_attention())
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    @property
    def attentions(self) -> list[Attention]:
        return [block.attention for block in self.blocks]

    def attention_mask(self, input_ids: Tensor, mask: Tensor | None) -> Tensor | None:
        """The bool mask the attentions see (True = real), before any CLS position is added."""
        if self.pad_mask == "none":
            return None
        if self.pad_mask == "token_nonzero":
            return input_ids > 0
        return mask

    def forward(self, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pool ``input_ids`` [B, L] (``mask`` [B, L] bool, True = real) into [B, d_model]."""
        x = self.embed(input_ids)
        attn_mask = self.attention_mask(input_ids, mask)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
            if attn_mask is not None:
                # The official model gives CLS the mask of the first token.
                attn_mask = torch.cat([attn_mask[:, :1], attn_mask], dim=1)
        if attn_mask is not None:
            # An all-padding row (an all-black image under token_nonzero) would leave no key to attend to.
            attn_mask = attn_mask.clone()
            attn_mask[:, 0] |= ~attn_mask.any(dim=1)
        x = self.dropout(x + self.positions[:, : x.shape[1]])
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.norm(x)
        return self.pool(x, attn_mask)

    def pool(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        if self.pooling in ("cls", "first_token"):
            return x[:, 0]
        if self.mean_pool == "all_positions" or attn_mask is None:
            return x.mean(dim=1)
        weights = attn_mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
