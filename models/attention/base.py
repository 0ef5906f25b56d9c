"""The attention interface shared by every mechanism.

Every attention is an ``nn.Module`` built by ``functools.partial`` from ``conf/attention/<name>.yaml`` and
completed by the encoder with ``num_heads``, ``head_dim`` and ``max_len``. It maps ``q, k, v`` of shape
``[B, H, N, D]`` and an optional bool ``mask`` of shape ``[B, N]`` (True at real tokens) to ``[B, H, N, D]``.

The padding contract is enforced here, once, so that every mechanism gets it for free:
q, k and v are zeroed at padded positions with a select (not a multiply: ``0 * nan = nan``), and output
rows at padded query positions are set to zero. A subclass must still make sure that a padded key adds
nothing to its normaliser (kernel methods zero the key features, softmax excludes the key).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Attention(nn.Module):
    """Base class: validates inputs, applies the padding contract, and calls ``attend``.

    A subclass implements ``attend`` (its fast path) and ``reference`` (the same function with an explicit
    N×N weight matrix: the test oracle and, on V = I, its attention map). It overrides ``explicit_weights``
    and ``apply_weights`` only when its output is not weights @ V, and takes its own options as keyword
    arguments besides these four.

    Args:
        num_heads: number of heads H.
        head_dim: size D of each head.
        max_len: longest sequence the model will see (including a CLS token); only methods with
            position-dependent parameters (Linformer) need it.
        causal: mask future keys. Methods that cannot do it raise at construction.
    """

    # The registry's key (conf/attention/<name>.yaml, W&B tags, results tables). By default the file name of
    # the defining module (softmax.py -> "softmax"): a copied module needs no edit but its class name.
    name: ClassVar[str] = "attention"
    supports_causal: ClassVar[bool] = True
    # True when the method approximates softmax attention rather than computing its own kernel exactly.
    is_approximation: ClassVar[bool] = False
    # True when parameters depend on absolute positions, so inputs must not exceed ``max_len``.
    needs_seq_len: ClassVar[bool] = False
    # True when the output is a convex combination of the values (non-negative weights summing to 1), so a
    # constant V gives that constant back. A class default: an instance may override it when the property
    # depends on its configuration (an output rescaling breaks it).
    is_convex: bool = False
    # What the columns of ``explicit_weights`` index (Linformer's are projected keys, not tokens).
    key_axis: ClassVar[str] = "key"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__module__.rsplit(".", 1)[-1]

    def __init__(self, num_heads: int, head_dim: int, max_len: int, causal: bool = False) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(
                f"{type(self).__name__}: num_heads and head_dim must be >= 1, "
                f"got num_heads={num_heads}, head_dim={head_dim}"
            )
        if causal and not self.supports_causal:
            raise ValueError(
                f"{type(self).__name__} does not support causal masking; set causal=false "
                f"or choose an attention that supports it"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.causal = causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend ``q`` over ``k, v``.

        Args:
            q, k, v: ``[B, H, N, D]``, the same dtype and device.
            mask: ``[B, N]`` bool, True at real tokens; ``None`` means no padding.

        Returns:
            ``[B, H, N, D]`` in the input dtype; rows at padded query positions are zero.
        """
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
        """The padding mask the mechanism applies to its keys: ``mask``, unless the method attends to pads
        on purpose (TaylorShift's ``mask_padding=False`` reproduces official code that has no mask)."""
        return mask

    # -- explicit weights, for attention maps (one example at a time, never for training) -------------------

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """``attend`` with an explicit N×N weight matrix, from this module's own state (the test oracle)."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no reference(q, k, v, mask); write it (the explicit N×N form of "
            f"attend) or override explicit_weights()"
        )

    def explicit_weights(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        """The weights ``attend`` applies to its values: ``[B, H, N, M]`` with ``apply_weights(w, v)``
        equal to ``attend(q, k, v)``; q, k are already zero at pads.

        The default runs ``reference`` on V = I: a reference that returns A·V then returns A exactly. A
        method whose output is not A·V (an output scale, a projection of V) overrides ``apply_weights``.
        """
        return self.reference(q, k, torch.eye(q.shape[2], dtype=q.dtype, device=q.device), mask)

    def apply_weights(self, weights: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The output rebuilt from ``explicit_weights`` and values already zero at pads: A·V by default."""
        return weights @ v

    def flops(self, batch: int, heads: int, seq_len: int, head_dim: int) -> float:
        """Forward matmul FLOPs (2 per multiply-add, matmuls only), for throughput reporting."""
        raise NotImplementedError

    def log_values(self) -> dict[str, Any]:
        """Values worth logging (chosen mode or backend, temperatures, redraw count)."""
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
        if self.needs_seq_len and q.shape[2] > self.max_len:
            raise ValueError(
                f"{self.name}: sequence length {q.shape[2]} exceeds max_len={self.max_len} "
                f"fixed at construction; raise the task's max_len or truncate the input"
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
    """Raise ``ValueError(message)`` unless ``condition``: one line per option check."""
    if not condition:
        raise ValueError(message)


def require_choice(owner: str, option: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise ``ValueError`` naming the valid choices unless ``value`` is one of ``choices``."""
    require(value in choices, f"{owner}: unknown {option} {value!r}; choose one of {choices}")


def zero_pads(tensors: tuple[Tensor, ...], mask: Tensor) -> tuple[Tensor, ...]:
    """``[B, H, N, *]`` tensors with the rows at pads (``mask`` ``[B, N]`` False) set to zero by a select, not
    a multiply, because 0·NaN = NaN."""
    keep = mask[:, None, :, None]
    return tuple(torch.where(keep, t, t.new_zeros(())) for t in tensors)


def count_real(
    mask: Tensor | None, batch: int, seq_len: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Number of real keys per sequence as ``[B, 1, 1, 1]`` (``seq_len`` where there is no mask)."""
    if mask is None:
        return torch.full((batch, 1, 1, 1), float(seq_len), device=device, dtype=dtype)
    return mask.sum(dim=1, dtype=dtype).view(batch, 1, 1, 1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Linear-attention states accumulate in fp32 (fp64 for fp64 inputs): bf16/fp16 sums over N lose the
    small terms and overflow at long N."""
    return torch.float64 if dtype == torch.float64 else torch.float32
