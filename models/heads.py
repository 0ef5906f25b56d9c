"""Classification heads and the full LRA model (encoder + head)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from models.attention.base import Attention
from models.encoder import LRAEncoder

INTERACTIONS = ("nli", "concat")


class ClassifierHead(nn.Module):
    """pooled -> Dense(mlp_dim) -> ReLU -> Dense(num_classes), as the official single-sequence head."""

    def __init__(self, d_model: int, mlp_dim: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, num_classes))

    def forward(self, pooled: Tensor) -> Tensor:
        return self.net(pooled)


class DualEncoderHead(nn.Module):
    """Retrieval head over two pooled documents u, v (LRA paper, App. A.1.3): ``nli`` classifies
    ``[u, v, u*v, u-v]`` (the paper), ``concat`` ``[u, v]`` (the released code's default)."""

    def __init__(self, d_model: int, mlp_dim: int, num_classes: int, interaction: str = "nli") -> None:
        super().__init__()
        if interaction not in INTERACTIONS:
            raise ValueError(f"model.retrieval_interaction={interaction!r} is not one of {INTERACTIONS}")
        self.interaction = interaction
        width = d_model * (4 if interaction == "nli" else 2)
        self.net = nn.Sequential(
            nn.Linear(width, mlp_dim),
            nn.ReLU(),
            nn.Linear(mlp_dim, mlp_dim // 2),
            nn.ReLU(),
            nn.Linear(mlp_dim // 2, num_classes),
        )

    def forward(self, u: Tensor, v: Tensor) -> Tensor:
        features = [u, v, u * v, u - v] if self.interaction == "nli" else [u, v]
        return self.net(torch.cat(features, dim=-1))


class LRAModel(nn.Module):
    """The encoder plus the task's head: the constructor of the ``model`` config node, which train.py
    completes with the attention factory and the data module's ``vocab_size``, ``seq_len``, ``num_classes``
    and ``dual``. With ``dual=True`` both documents go through the same encoder (shared weights);
    ``encoder_options`` are :class:`LRAEncoder`'s (layers, heads, dropout, pooling, ...)."""

    def __init__(
        self,
        attention: Callable[..., Attention],
        vocab_size: int,
        seq_len: int,
        num_classes: int,
        d_model: int,
        mlp_dim: int,
        dual: bool = False,
        retrieval_interaction: str = "nli",
        **encoder_options: Any,
    ) -> None:
        super().__init__()
        self.encoder = LRAEncoder(
            attention, vocab_size, seq_len, d_model=d_model, mlp_dim=mlp_dim, **encoder_options
        )
        self.dual = dual
        self.head: nn.Module = (
            DualEncoderHead(d_model, mlp_dim, num_classes, retrieval_interaction)
            if dual
            else ClassifierHead(d_model, mlp_dim, num_classes)
        )

    def forward(
        self,
        input_ids: Tensor,
        mask: Tensor | None = None,
        input_ids_2: Tensor | None = None,
        mask_2: Tensor | None = None,
    ) -> Tensor:
        if not self.dual:
            return self.head(self.encoder(input_ids, mask))
        if input_ids_2 is None:
            raise ValueError("a dual-encoder model needs input_ids_2 (the second document)")
        return self.head(self.encoder(input_ids, mask), self.encoder(input_ids_2, mask_2))
