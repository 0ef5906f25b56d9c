"""Softmax attention through PyTorch SDPA, with a pinned, recorded backend (Vaswani et al., 2017)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from models.attention.base import Attention, require, require_probability

BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}

# Substrings of the aten op that SDPA dispatches to. The math backend is composite in recent torch, so it
# may show up only as its pieces: a softmax with no fused kernel beside it.
_DISPATCH_NAMES = {
    "cudnn": "cudnn_attention",
    "flash": "flash_attention",
    "efficient": "efficient_attention",
    "math": "attention_math",
}


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False, dropout_p: float = 0.0
) -> Tensor:
    """Softmax attention by SDPA under the caller's backend context; ``mask`` ``[B, N]`` is True at real
    keys, ``dropout_p`` acts on the weights."""
    attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, N] keeps memory O(N)
    if attn_mask is not None and causal:
        # SDPA rejects attn_mask together with is_causal, so the causal padded case pays for an N x N mask.
        attn_mask = (
            attn_mask & torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=mask.device).tril()
        )
    is_causal = causal and attn_mask is None
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
    )


def softmax_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """Plain softmax(q kᵀ/√d) v with an explicit N x N matrix; masked keys are excluded."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, N, N]
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones_like(allowed[0, 0]).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class SoftmaxAttention(Attention):
    """Scaled dot-product attention (Vaswani et al., 2017) via ``F.scaled_dot_product_attention``.

    ``backend='auto'`` lets PyTorch choose (and logs the kernel it picked); ``flash | efficient | cudnn |
    math`` pins one and raises if it cannot run the inputs. ``dropout`` acts on the weights in training.
    """

    is_convex = True

    def __init__(self, *args: Any, backend: str = "auto", dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        require(
            backend in BACKENDS,
            f"softmax: unknown SDPA backend {backend!r}; choose one of {sorted(BACKENDS)}",
        )
        require_probability("softmax", "dropout (the task's attn_dropout unless set)", dropout)
        self.backend = backend
        self.dropout = dropout
        self.dispatched: str | None = None if BACKENDS[backend] is None else backend

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        pinned = BACKENDS[self.backend]
        dropout_p = self.dropout if self.training else 0.0
        if pinned is None and self.dispatched is None:
            self.dispatched = probe_dispatched_backend(q, k, v, mask, self.causal)
        if pinned is None:
            return softmax_attention(q, k, v, mask, self.causal, dropout_p)
        try:
            with sdpa_kernel([pinned]):
                return softmax_attention(q, k, v, mask, self.causal, dropout_p)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as error:
            # PyTorch's message ("no viable backend") names neither the backend nor the inputs.
            reason = str(error).strip().splitlines()[0].rstrip(".")
            raise RuntimeError(
                f"softmax: the pinned SDPA backend {self.backend!r} cannot run these inputs "
                f"(device={q.device.type}, dtype={q.dtype}, head_dim={q.shape[-1]}, "
                f"masked={mask is not None}, causal={self.causal}); PyTorch says: {reason}. "
                f"Pin another backend ({', '.join(sorted(BACKENDS))}) or use backend=auto"
            ) from error

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return softmax_attention_ref(q, k, v, mask, self.causal)

    def flops(self, batch: int, heads: int, seq_len: int, head_dim: int) -> float:
        return 4.0 * batch * heads * seq_len**2 * head_dim

    def log_values(self) -> dict[str, Any]:
        return {"backend": self.backend, "backend_dispatched": self.dispatched or "unknown"}


# A dispatch mode cannot be traced; under torch.compile the probe runs eagerly (a graph break, once).
@torch.compiler.disable
def probe_dispatched_backend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> str:
    """Name the SDPA kernel that PyTorch picks for inputs like these, from the aten ops it dispatches."""
    small = [t[:1, :1, : min(t.shape[2], 64)].detach() for t in (q, k, v)]
    small_mask = None if mask is None else mask[:1, : small[0].shape[2]]
    with torch.no_grad(), _OpRecorder() as recorder:
        softmax_attention(*small, mask=small_mask, causal=causal)
    names = " ".join(recorder.ops)
    for backend, marker in _DISPATCH_NAMES.items():
        if marker in names:
            return backend
    return "math" if "softmax" in names else "unknown"


class _OpRecorder(TorchDispatchMode):
    """Records the aten ops run inside it; SDPA is composite, so its chosen kernel shows up here."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
