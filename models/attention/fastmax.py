"""Fastmax (FAST, Gerami et al., 2024, arXiv 2402.07901): polynomial attention on max-normalised q, k.

Weights are m_j f(x_ij)/Σ_j m_j f(x_ij) with f(x) = a0 + a1·x + a2·x² (order 2) or a0 + a1·x (order 1),
x_ij = q̃_i·k̃_j/T. With ``maxnorm`` q̃ = lim·q/max_i‖q_i‖ over the real tokens of each (batch, head), so
|x| ≤ lim²/T. The sums factorise exactly as TaylorShift's, through the polynomial kernel with the
augmented V' = [1, V]/N_v whose pad rows are zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention.base import Attention, accumulation_dtype, count_real, require
from models.attention.polynomial import (
    IMPLS,
    Coefficients,
    normalized_poly_attention,
    quadratic_features,
    select_impl,
)

NORMALIZATIONS = ("maxnorm", "running_maxnorm", "scaled", "none")
DROPOUT_MODES = ("none", "feature", "output_noise")
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class FastmaxOptions:
    """What Fastmax computes: validated once, shared by the fast path, the reference and the module.

    Attributes:
        order: 1 or 2, the degree p of f(x) = Σ_{ℓ≤p} a_ℓ xˡ.
        a0, a1, a2: coefficients (defaults 1, 1, 1/2: the Taylor polynomial of exp; a2 unused for order 1).
        normalize: ``maxnorm`` (q̃ = lim·q/max_i‖q_i‖ over real tokens), ``running_maxnorm`` (the max over
            tokens ≤ i, which causal attention needs), ``scaled`` (x = q·k/(8√d)) or ``none``.
        lim: largest normalised token norm; order 1 requires lim ≤ 1.
        center: subtract each token's mean over its features before normalising.
        temperature: T; x = q̃·k̃/T.
        causal: attend to keys j ≤ i only.
        allow_global_norm_causal: accept ``maxnorm`` with ``causal``, whose sequence-global max leaks the
            future; without it that combination raises (use ``running_maxnorm``).
        detach_norm: stop gradients through the max-norm statistic (the official CUDA backward treats the
            normalised q, k as leaves); the default differentiates through it.
        dropout_mode: ``none``, ``feature`` (dropout on q⊗q, k⊗k for order 2, on q, k for order 1) or
            ``output_noise`` (o·(1 + r·ξ), ξ ~ N(0, 1)), the official variants; training only.
        dropout: the rate r of ``dropout_mode``.
        impl: ``auto | torch | triton`` for the polynomial kernel.
    """

    order: int = 2
    a0: float = 1.0
    a1: float = 1.0
    a2: float = 0.5
    normalize: str = "maxnorm"
    lim: float = 1.0
    center: bool = False
    temperature: float = 1.0
    causal: bool = False
    allow_global_norm_causal: bool = False
    detach_norm: bool = False
    dropout_mode: str = "none"
    dropout: float = 0.0
    impl: str = "auto"

    def __post_init__(self) -> None:
        order, lim, temperature = self.order, self.lim, self.temperature
        a0, a1, a2 = self.a0, self.a1, self.a2
        require(order in (1, 2), f"fastmax: order must be 1 or 2, got {order!r}")
        require(
            self.normalize in NORMALIZATIONS,
            f"fastmax: unknown normalize {self.normalize!r}; choose one of {NORMALIZATIONS}",
        )
        require(
            temperature > 0 and lim > 0,
            f"fastmax: temperature and lim must be > 0, got temperature={temperature}, lim={lim}",
        )
        require(
            order == 1 or (a2 > 0 and a0 >= a1 * a1 / (4 * a2)),
            f"fastmax: order 2 needs a2 > 0 and a0 >= a1²/(4·a2) so that the denominator stays positive; "
            f"got a0={a0}, a1={a1}, a2={a2} (defaults 1, 1, 0.5)",
        )
        require(
            order == 2 or lim <= 1,
            f"fastmax: order 1 requires lim <= 1 (f(x) = a0 + a1·x is positive only for x >= -a0/a1), "
            f"got lim={lim}",
        )
        require(
            order == 2 or self.normalize in ("maxnorm", "running_maxnorm"),
            f"fastmax: order 1 needs bounded logits, i.e. normalize='maxnorm' or 'running_maxnorm'; "
            f"normalize={self.normalize!r} can make the denominator negative",
        )
        require(
            order == 2 or a0 >= abs(a1) * lim * lim / temperature,
            f"fastmax: order 1 needs a0 >= |a1|·lim²/T so that f(x) >= 0 for |x| <= lim²/T; "
            f"got a0={a0}, a1={a1}, lim={lim}, temperature={temperature}",
        )
        require(
            self.dropout_mode in DROPOUT_MODES,
            f"fastmax: unknown dropout_mode {self.dropout_mode!r}; choose one of {DROPOUT_MODES}",
        )
        require(0.0 <= self.dropout < 1.0, f"fastmax: dropout must lie in [0, 1), got {self.dropout}")
        require(
            self.dropout == 0 or self.dropout_mode != "none",
            f"fastmax: dropout={self.dropout} needs dropout_mode='feature' or 'output_noise'",
        )
        require(
            not (self.causal and self.normalize == "maxnorm" and not self.allow_global_norm_causal),
            "fastmax: normalize='maxnorm' with causal=true leaks the future through the sequence-global "
            "max; use normalize='running_maxnorm', or set allow_global_norm_causal=true to accept the leak",
        )
        require(self.impl in IMPLS, f"fastmax: unknown impl {self.impl!r}; choose one of {IMPLS}")

    @property
    def coefficients(self) -> Coefficients:
        """(a, b, c) of the kernel c + b·s + a·s² on s = q̃·k̃, with T folded in."""
        a2 = self.a2 if self.order == 2 else 0.0
        return a2 / self.temperature**2, self.a1 / self.temperature, self.a0


def _max_norms(x: Tensor, mask: Tensor | None, normalize: str) -> Tensor:
    """max_i ‖x_i‖ over real tokens (``maxnorm``) or over real tokens ≤ i (``running_maxnorm``, which cannot
    see the future): ``[B, H, 1 | N]``, at least eps."""
    norms = x.norm(dim=-1)  # [B, H, N]
    if mask is not None:
        norms = torch.where(mask[:, None, :], norms, norms.new_zeros(()))
    largest = norms.amax(dim=-1, keepdim=True) if normalize == "maxnorm" else norms.cummax(dim=-1).values
    return largest.clamp_min(_NORM_EPS)


def _normalize_qk(q: Tensor, k: Tensor, mask: Tensor | None, opts: FastmaxOptions) -> tuple[Tensor, Tensor]:
    """q̃, k̃ ``[B, H, N, d]`` with T left out. Statistics run over the real tokens of each (batch, head)."""

    def one(x: Tensor) -> Tensor:
        if opts.center:
            x = x - x.mean(dim=-1, keepdim=True)
        if opts.normalize in ("none", "scaled"):
            # x = q·k/(8√d) for "scaled"; the factor is split evenly between q and k.
            return x if opts.normalize == "none" else x / math.sqrt(8 * math.sqrt(x.shape[-1]))
        largest = _max_norms(x, mask, opts.normalize)
        if opts.detach_norm:
            largest = largest.detach()
        return x * (opts.lim / largest).unsqueeze(-1)

    return one(q), one(k)


def _fastmax(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, opts: FastmaxOptions, dropout: float, impl: str
) -> Tensor:
    acc = accumulation_dtype(q.dtype)
    q_norm, k_norm = _normalize_qk(q.to(acc), k.to(acc), mask, opts)
    n_real = count_real(mask, q.shape[0], q.shape[2], q.device, acc)
    features: list[Tensor] = []  # q⊗q, k⊗k with dropout applied
    if opts.dropout_mode == "feature" and dropout > 0 and opts.order == 1:
        q_norm, k_norm = F.dropout(q_norm, p=dropout), F.dropout(k_norm, p=dropout)
    elif opts.dropout_mode == "feature" and dropout > 0:
        # Numerator and denominator read the same dropped features, so rows still sum to 1.
        features = [F.dropout(quadratic_features(x), p=dropout) for x in (q_norm, k_norm)]
    # V' = [1, V]/N_v: 1/N_v keeps the sums O(1) in low precision and cancels in the ratio.
    out = normalized_poly_attention(
        impl,
        q_norm,
        k_norm,
        v.to(acc),
        torch.ones_like(n_real),
        n_real,
        mask,
        opts.coefficients,
        opts.causal,
        q.dtype,
        *features,
    )
    if opts.dropout_mode == "output_noise" and dropout > 0:
        out = out * (1 + dropout * torch.randn_like(out))
    return out.to(q.dtype)


def _resolve_impl(opts: FastmaxOptions, q: Tensor, dropout: float) -> str:
    quadratic_dropout = opts.dropout_mode == "feature" and dropout > 0 and opts.order == 2
    return select_impl(
        opts.impl, q, opts.causal, "feature dropout on q⊗q, k⊗k" if quadratic_dropout else None
    )


def _reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, opts: FastmaxOptions) -> Tensor:
    acc = accumulation_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        if opts.center:
            q, k = q - q.mean(dim=-1, keepdim=True), k - k.mean(dim=-1, keepdim=True)
        x = q @ k.transpose(-1, -2) / opts.temperature  # [B, H, N, N]
        if opts.normalize == "scaled":
            x = x / (8 * math.sqrt(q.shape[-1]))
        elif opts.normalize in ("maxnorm", "running_maxnorm"):
            q_max, k_max = _max_norms(q, mask, opts.normalize), _max_norms(k, mask, opts.normalize)
            x = opts.lim * opts.lim * x / (q_max[..., :, None] * k_max[..., None, :])
        weights = opts.a0 + opts.a1 * x + (opts.a2 * x * x if opts.order == 2 else 0.0)
        if mask is not None:
            weights = torch.where(mask[:, None, None, :], weights, weights.new_zeros(()))
        if opts.causal:
            weights = weights.tril()
        out = weights @ v / weights.sum(dim=-1, keepdim=True)
    return out.to(q.dtype)


def fastmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, **options: Any) -> Tensor:
    """Fastmax attention in O(N·d^(p+1)) per head.

    Args:
        q, k, v: ``[B, H, N, d]``.
        mask: ``[B, N]`` bool, True at real tokens; padded keys contribute nothing.
        **options: the fields of ``FastmaxOptions``. Dropout acts whenever ``dropout > 0``: the caller
            passes 0 in eval.

    Returns:
        ``[B, H, N, d]`` in the input dtype.
    """
    opts = FastmaxOptions(**options)
    # Under autocast the state matmuls would fall back to bf16/fp16; they must stay in fp32.
    with torch.autocast(q.device.type, enabled=False):
        return _fastmax(q, k, v, mask, opts, opts.dropout, _resolve_impl(opts, q, opts.dropout))


def fastmax_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, **options: Any
) -> Tensor:
    """The definition with an explicit N×N matrix: A_ij = m_j f(x_ij)/Σ_j m_j f(x_ij), Y = A·V.

    Args: as ``fastmax_attention`` (dropout and impl are not used). Computed in fp32 (fp64 for fp64 inputs).
    """
    return _reference(q, k, v, mask, FastmaxOptions(**options))


class FastmaxAttention(Attention):
    """Fastmax (Gerami et al., 2024, arXiv 2402.07901): factorizable polynomial attention, O(N·d^(p+1)).

    Args:
        **options: the fields of ``FastmaxOptions``.
    """

    name = "fastmax"
    supports_causal = True
    # The option checks keep f >= 0, so the weights form a convex combination (output noise acts in training).
    is_convex = True

    def __init__(
        self, num_heads: int, head_dim: int, max_len: int, causal: bool = False, **options: Any
    ) -> None:
        super().__init__(num_heads, head_dim, max_len, causal)
        self.options = FastmaxOptions(causal=causal, **options)
        self.impl_used: str | None = None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        dropout = self.options.dropout if self.training else 0.0
        self.impl_used = _resolve_impl(self.options, q, dropout)
        with torch.autocast(q.device.type, enabled=False):
            return _fastmax(q, k, v, mask, self.options, dropout, self.impl_used)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return _reference(q, k, v, mask, self.options)

    def flops(self, batch: int, heads: int, seq_len: int, head_dim: int) -> float:
        """Matmul-only forward FLOPs, non-causal: 4N·d·(d+1)² per head for order 2 and 4N·d·(d+1) for
        order 1."""
        features = head_dim * (head_dim + 1) if self.options.order == 2 else head_dim
        return 4.0 * batch * heads * seq_len * features * (head_dim + 1)

    def log_values(self) -> dict[str, Any]:
        return {"impl": self.options.impl, "impl_used": self.impl_used or "unknown"}
