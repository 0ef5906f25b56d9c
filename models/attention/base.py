"""The attention interface shared by every mechanism.

An attention is an ``nn.Module`` built by ``functools.partial`` from ``conf/attention/<name>.yaml`` and
completed by the encoder with ``num_heads``, ``head_dim`` and ``max_len``. It maps ``q, k, v``
``[B, H, N, D]`` and an optional bool ``mask`` ``[B, N]`` (True at real tokens) to ``[B, H, N, D]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Attention(nn.Module):
    """Validates inputs, applies the padding contract once and calls ``attend``.

    The contract: q, k, v are zeroed at pads with a select (not a multiply: 0·NaN = NaN) and output rows at
    padded queries are zero; a subclass must still keep padded keys out of its normaliser. A subclass
    implements ``attend`` (its fast path) and ``reference`` (the same function with an explicit N×N weight
    matrix: the test oracle and, on V = I, its attention map), and overrides ``explicit_weights`` and
    ``apply_weights`` only when its output is not weights @ V. ``causal`` masks future keys; methods that
    cannot do it raise at construction. ``max_len`` matters only to position-dependent methods (Linformer).
    """

    # The registry key (conf/attention/<name>.yaml, W&B tags, results): by default the defining module's
    # file name, so a copied module needs no edit but its class name.
    name: ClassVar[str] = "attention"
    supports_causal: ClassVar[bool] = True
    needs_seq_len: ClassVar[bool] = False  # its parameters depend on absolute positions, up to max_len
    # Non-negative weights summing to 1 (a constant V comes back); an instance may override it.
    is_convex: bool = False
    key_axis: ClassVar[str] = "key"  # what the columns of explicit_weights index

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__module__.rsplit(".", 1)[-1]

    def __init__(self, num_heads: int, head_dim: int, max_len: int, causal: bool = False) -> None:
        super().__init__()
        owner = type(self).__name__
        require(
            num_heads >= 1 and head_dim >= 1,
            f"{owner}: num_heads and head_dim must be >= 1, got num_heads={num_heads}, head_dim={head_dim}",
        )
        require(
            not causal or self.supports_causal,
            f"{owner} does not support causal masking; set causal=false "
            f"or choose an attention that supports it",
        )
        self.num_heads, self.head_dim, self.max_len, self.causal = num_heads, head_dim, max_len, causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, H, N, D]`` in the input dtype, zero at padded queries."""
        self.check_inputs(q, k, v, mask)
        key_mask = self.key_mask(mask)
        if key_mask is not None:
            q, k, v = zero_pads((q, k, v), key_mask)
        out = self.attend(q, k, v, key_mask)
        return out if mask is None else zero_pads((out,), mask)[0]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The mechanism itself; q, k, v are already zero at padded positions."""
        raise NotImplementedError

    def key_mask(self, mask: Tensor | None) -> Tensor | None:
        """The mask applied to keys: ``mask``, unless the method attends to pads on purpose."""
        return mask

    # Explicit weights, for attention maps (one example at a time, never for training).

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """``attend`` with an explicit N×N weight matrix, from this module's own state (the test oracle)."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no reference(q, k, v, mask); write it (the explicit N×N form of "
            f"attend) or override explicit_weights()"
        )

    def explicit_weights(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        """``[B, H, N, M]`` with ``apply_weights(w, v) == attend(q, k, v)``: ``reference`` on V = I."""
        return self.reference(q, k, torch.eye(q.shape[2], dtype=q.dtype, device=q.device), mask)

    def apply_weights(self, weights: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The output rebuilt from ``explicit_weights`` and values already zero at pads."""
        return weights @ v

    def flops(self, batch: int, heads: int, seq_len: int, head_dim: int) -> float:
        """Forward matmul FLOPs (2 per multiply-add), for throughput reporting."""
        raise NotImplementedError

    def log_values(self) -> dict[str, Any]:
        return {}

    def check_inputs(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
        if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
            raise ValueError(
                f"{self.name}: q, k, v must share the shape [batch, heads, seq, head_dim]; "
                f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if q.shape[1] != self.num_heads or q.shape[3] != self.head_dim:
            raise ValueError(
                f"{self.name}: built for {self.num_heads} heads of size {self.head_dim}, "
                f"got heads={q.shape[1]}, head_dim={q.shape[3]}"
            )
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != (q.shape[0], q.shape[2]):
                raise ValueError(
                    f"{self.name}: mask must be bool [batch, seq] = "
                    f"{(q.shape[0], q.shape[2])}, got {mask.dtype} {tuple(mask.shape)}"
                )
            if not bool(mask.any(dim=1).all()):
                raise ValueError(f"{self.name}: every sequence needs at least one real token (mask=True)")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def require_choice(owner: str, option: str, value: object, choices: tuple[object, ...]) -> None:
    require(value in choices, f"{owner}: unknown {option} {value!r}; choose one of {choices}")


def require_probability(owner: str, option: str, value: object) -> None:
    """A dropout rate, a number in [0, 1): a bad one fails when built, not in the first training step."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    require(number and 0.0 <= value < 1.0, f"{owner}: {option} must lie in [0, 1), got {value!r}")


def zero_pads(tensors: tuple[Tensor, ...], mask: Tensor) -> tuple[Tensor, ...]:
    """``[B, H, N, *]`` tensors zeroed where ``mask`` ``[B, N]`` is False, by a select (0·NaN = NaN)."""
    keep = mask[:, None, :, None]
    return tuple(torch.where(keep, t, t.new_zeros(())) for t in tensors)


def count_real(mask: Tensor | None, like: Tensor) -> Tensor:
    """Real keys per sequence, ``[B, 1, 1, 1]`` in ``like``'s dtype (``like`` is ``[B, H, N, *]``)."""
    batch, dtype = like.shape[0], like.dtype
    if mask is None:
        return torch.full((batch, 1, 1, 1), float(like.shape[2]), device=like.device, dtype=dtype)
    return mask.sum(dim=1, dtype=dtype).view(batch, 1, 1, 1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 (fp64 for fp64 inputs): bf16/fp16 sums over N lose small terms and overflow."""
    return torch.float64 if dtype == torch.float64 else torch.float32
