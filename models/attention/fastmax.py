"""Fastmax (Gerami et al. 2024, arXiv 2402.07901): polynomial attention on max-normalised q, k.

Weights are m_j f(x_ij)/Σ_j m_j f(x_ij), f(x) = a0 + a1·x (+ a2·x² for order 2), x_ij = q̃_i·k̃_j/T; with
``maxnorm`` q̃ = lim·q/max_i‖q_i‖ over real tokens, so |x| ≤ lim²/T. The sums factorise through the
polynomial kernel with V' = [1, V]/N_v, zero at pads.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.attention.base import accumulation_dtype, count_real
from models.attention.kernels import select_impl
from models.attention.options import FastmaxOptions
from models.attention.polynomial import (
    Augmentation,
    PolynomialAttention,
    QuadFeatures,
    normalized_poly_attention,
    normalized_poly_attention_ref,
    quadratic_features,
)

_NORM_EPS = 1e-12


def _max_norms(x: Tensor, mask: Tensor | None, normalize: str) -> Tensor:
    """max_i ‖x_i‖ over real tokens (``maxnorm``, ``[B, H, 1]``) or real tokens ≤ i (``running_maxnorm``,
    ``[B, H, N]``), at least eps."""
    norms = x.norm(dim=-1)  # [B, H, N]
    if mask is not None:
        norms = torch.where(mask[:, None, :], norms, norms.new_zeros(()))
    largest = norms.amax(dim=-1, keepdim=True) if normalize == "maxnorm" else norms.cummax(dim=-1).values
    return largest.clamp_min(_NORM_EPS)


def _normalize_qk(q: Tensor, k: Tensor, mask: Tensor | None, opts: FastmaxOptions) -> tuple[Tensor, Tensor]:
    """q̃, k̃ ``[B, H, N, d]`` without T."""

    def one(x: Tensor) -> Tensor:
        if opts.center:
            x = x - x.mean(dim=-1, keepdim=True)
        if opts.normalize in ("none", "scaled"):
            # "scaled": x = q·k/(8√d), the factor split evenly between q and k.
            return x if opts.normalize == "none" else x / math.sqrt(8 * math.sqrt(x.shape[-1]))
        largest = _max_norms(x, mask, opts.normalize)
        if opts.detach_norm:
            largest = largest.detach()
        return x * (opts.lim / largest).unsqueeze(-1)

    return one(q), one(k)


def _fastmax(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, opts: FastmaxOptions, dropout: float
) -> tuple[Tensor, str]:
    """The output and the kernel implementation that ran."""
    quadratic_dropout = opts.dropout_mode == "feature" and dropout > 0 and opts.order == 2
    torch_only = "feature dropout on q⊗q, k⊗k" if quadratic_dropout else None
    impl = select_impl(opts.impl, q, opts.causal, torch_only)
    acc = accumulation_dtype(q.dtype)
    # Under autocast the state matmuls would fall back to bf16/fp16.
    with torch.autocast(q.device.type, enabled=False):
        q_norm, k_norm = _normalize_qk(q.to(acc), k.to(acc), mask, opts)
        n_real = count_real(mask, q_norm)
        features: QuadFeatures | None = None
        if opts.dropout_mode == "feature" and dropout > 0 and opts.order == 1:
            q_norm, k_norm = F.dropout(q_norm, p=dropout), F.dropout(k_norm, p=dropout)
        elif quadratic_dropout:
            # Numerator and denominator read the same dropped features, so rows still sum to 1.
            q_quad, k_quad = (F.dropout(quadratic_features(x), p=dropout) for x in (q_norm, k_norm))
            features = (q_quad, k_quad)
        # 1/N_v keeps the sums O(1) in low precision and cancels in the ratio.
        augmentation = Augmentation(torch.ones_like(n_real), n_real, mask)
        out = normalized_poly_attention(
            impl, q_norm, k_norm, v.to(acc), augmentation, opts.coefficients, opts.causal, q.dtype, features
        )
        if opts.dropout_mode == "output_noise" and dropout > 0:
            out = out * (1 + dropout * torch.randn_like(out))
    return out.to(q.dtype), impl


def _reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, opts: FastmaxOptions) -> Tensor:
    """A_ij = m_j f(x_ij)/Σ_j m_j f(x_ij) as an explicit N×N matrix, Y = A·V (no dropout)."""
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
        out = normalized_poly_attention_ref(x, v, opts.logit_coefficients, mask, opts.causal)
    return out.to(q.dtype)


def fastmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, **options: Any) -> Tensor:
    """Fastmax in O(N·d^(p+1)) per head; ``options`` are ``FastmaxOptions`` fields (dropout acts whenever
    it is > 0)."""
    opts = FastmaxOptions(**options)
    return _fastmax(q, k, v, mask, opts, opts.dropout)[0]


def fastmax_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, **options: Any
) -> Tensor:
    return _reference(q, k, v, mask, FastmaxOptions(**options))


class FastmaxAttention(PolynomialAttention):
    """Fastmax (Gerami et al. 2024); ``**options`` are the fields of ``FastmaxOptions``."""

    options_class = FastmaxOptions
    options: FastmaxOptions
    is_convex = True  # the option checks keep f >= 0

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        out, self.impl_used = _fastmax(q, k, v, mask, self.options, self.dropout_now())
        return out

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return _reference(q, k, v, mask, self.options)

    def flops(self, batch: int, heads: int, seq_len: int, head_dim: int) -> float:
        """Non-causal: 4N·d·(d+1)² per head for order 2, 4N·d·(d+1) for order 1."""
        features = head_dim * (head_dim + 1) if self.options.order == 2 else head_dim
        return 4.0 * batch * heads * seq_len * features * (head_dim + 1)
