"""TaylorShift (Nauen, Palacio, Dengel, ICPR 2024, arXiv 2403.02920): attention with the Taylor polynomial
of exp.

Weights are f(x_ij)/Σ_j m_j f(x_ij), f(x) = c + b·x + a·x², logits x_ij = τ_h·cos(q_i, k_j) (a learned
per-head temperature, no 1/√d). The direct mode builds the N×N matrix in O(N²d), the efficient mode
factorises it through the polynomial kernel in O(N·d³): the same function. With ``output_norm`` outputs are
multiplied by √(N_v/d) (N_v = real keys).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention.base import accumulation_dtype, count_real
from models.attention.kernels import select_impl
from models.attention.options import TaylorShiftOptions
from models.attention.polynomial import (
    Augmentation,
    PolynomialAttention,
    augmented_values,
    normalized_poly_attention,
    normalized_poly_attention_ref,
    poly_readout,
    poly_states,
    split_ratio,
)

_NORM_EPS = 1e-12


def _output_scale(mask: Tensor | None, causal: bool, shape: torch.Size, like: Tensor) -> Tensor:
    """√(N_v/d) with N_v the real keys (j ≤ i when causal): ``[B, 1, 1 | N, 1]`` in ``like``'s dtype."""
    batch, _, seq_len, d = shape
    real = torch.ones(batch, seq_len, device=like.device) if mask is None else mask
    real = real.to(like.dtype)
    n_real = real.cumsum(dim=1)[:, None, :, None] if causal else real.sum(dim=1)[:, None, None, None]
    return torch.sqrt(n_real / d)


def _logit_factors(
    q: Tensor, k: Tensor, tau: Tensor, normalize_input: bool, dtype: torch.dtype, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """s·q̂, s·k̂ in ``dtype`` with x_ij = q̂_i·k̂_j = τ·cos(q, k), or q·k/√d (unbounded, no τ, as the
    official module) with ``normalize_input=False``; ``scale`` is s (the efficient mode's d^(1/4))."""
    q, k = q.to(dtype), k.to(dtype)
    if not normalize_input:
        return q * (scale / math.sqrt(q.shape[-1])), k * scale if scale != 1.0 else k
    # F.normalize, τ and s folded into one per-row factor: one full-size multiply, a lighter backward.
    q_factor = (scale * tau.to(dtype)).view(1, -1, 1, 1) / _row_norms(q)
    return q * q_factor, k * (scale / _row_norms(k))


def _row_norms(x: Tensor) -> Tensor:
    """max(‖x_i‖, eps) per row, ``[..., 1]``: F.normalize's denominator."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def _direct(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, opts: TaylorShiftOptions, dropout: float
) -> Tensor:
    """X = q̂k̂ᵀ (q, k are q̂, k̂), rows divided by M_i = f(max_j m_j|x_ij|), normalised, dropped out, times V."""
    acc, (a, b, c) = q.dtype, opts.coefficients
    # The matmuls run in the input dtype (tensor cores for bf16), the rest in fp32.
    x = (q.to(v.dtype) @ k.to(v.dtype).transpose(-1, -2)).to(acc)  # [B, H, N, N]
    allowed = None  # [B | 1, 1, N, N] bool where key j may be attended by query i
    if opts.causal:
        positions = torch.arange(x.shape[-1], device=x.device)
        allowed = positions[:, None] >= positions[None, :]
    if mask is not None:
        key_mask = mask[:, None, None, :]
        allowed = key_mask if allowed is None else allowed & key_mask
    # f(x) <= max(f(r), f(-r)) for |x| <= r keeps entries <= 1 (-inf logits would not mask: f(-1e10) is
    # huge). M_i cancels in the row normalisation, hence no gradient.
    with torch.no_grad():
        if opts.causal:
            radius = torch.where(allowed, x.abs(), x.new_zeros(())).amax(dim=-1, keepdim=True)
        else:
            # Zeroed pad keys give x = 0, which cannot raise max_j |x_ij|: no mask needed.
            radius = torch.maximum(x.amax(dim=-1, keepdim=True), -x.amin(dim=-1, keepdim=True))
        row_scale = torch.maximum(c + b * radius + a * radius.square(), c - b * radius + a * radius.square())
    weights = (c + x * (b + a * x)) / row_scale
    if allowed is not None:
        weights = torch.where(allowed, weights, weights.new_zeros(()))
    row_sum = weights.sum(dim=-1, keepdim=True)
    # Only a causal row of a leading pad can see no real key; its output is zeroed by the caller.
    attn = weights / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    attn = F.dropout(attn, p=dropout) if dropout > 0 else attn
    return (attn.to(v.dtype) @ v).to(acc)


def _efficient(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, opts: TaylorShiftOptions, dropout: float, impl: str
) -> Tensor:
    """Y' = a(Q⊠Q)S2 + b·s²·Q·S1 + c·s⁴·S0 for Q = s·q̂, K = s·k̂ (q, k are Q, K), V' = [α·1, V]/N_v.

    Y = Y'[:, 1:]/Y'[:, 0]; with s = d^(1/4) every term is d·f(x_ij), and α = √(d/N_v) leaves √(N_v/d).
    ``normalize_input=False`` drops the scheme as the official module does: s = 1 and no 1/N_v.
    """
    acc, d = q.dtype, q.shape[-1]
    scale = opts.efficient_scale(d)
    n_real = count_real(mask, q)  # [B, 1, 1, 1]
    # Causal N_v depends on the query, so α cannot sit in V'; the caller scales the output instead.
    in_values = opts.output_norm and not opts.causal
    alpha = torch.sqrt(d / n_real) if in_values else torch.ones_like(n_real)
    # 1/N_v keeps the sums O(1) (fp16 sums overflow beyond ~65k tokens).
    augmentation = Augmentation(alpha, n_real if opts.normalize_input else None, mask)
    coefficients = (opts.a, opts.b * scale**2, opts.c * scale**4)
    if dropout > 0:
        # The official efficient dropout acts on S2, denominator column included.
        s0, s1, s2 = poly_states(k, augmented_values(v.to(acc), augmentation), coefficients)
        return split_ratio(poly_readout(q, (s0, s1, F.dropout(s2, p=dropout)), coefficients))
    return normalized_poly_attention(impl, q, k, v.to(acc), augmentation, coefficients, opts.causal, v.dtype)


def _taylorshift(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau: Tensor,
    mask: Tensor | None,
    opts: TaylorShiftOptions,
    mode: str,
    dropout: float,
) -> tuple[Tensor, str]:
    """The output and the kernel implementation that ran (``torch`` in the direct mode)."""
    acc = accumulation_dtype(q.dtype)
    impl = "torch"
    if mode == "direct":
        q_hat, k_hat = _logit_factors(q, k, tau, opts.normalize_input, acc)
        out = _direct(q_hat, k_hat, v, mask, opts, dropout)
    else:
        impl = select_impl(
            opts.impl, q, opts.causal, "the efficient-mode dropout on S2" if dropout > 0 else None
        )
        # Under autocast the state matmuls would fall back to bf16/fp16.
        with torch.autocast(q.device.type, enabled=False):
            scale = opts.efficient_scale(q.shape[-1])
            q_scaled, k_scaled = _logit_factors(q, k, tau, opts.normalize_input, acc, scale)
            out = _efficient(q_scaled, k_scaled, v, mask, opts, dropout, impl)
    # The non-causal efficient mode carries √(N_v/d) in V' (as α); the others scale the output.
    if opts.output_norm and (mode == "direct" or opts.causal):
        out = out * _output_scale(mask, opts.causal, v.shape, out)
    return out.to(v.dtype), impl


def _reference(
    q: Tensor, k: Tensor, v: Tensor, tau: Tensor, mask: Tensor | None, opts: TaylorShiftOptions
) -> Tensor:
    """A_ij = m_j f(x_ij)/Σ_j m_j f(x_ij) as an explicit N×N matrix, Y = A·V·√(N_v/d) (no dropout)."""
    acc = accumulation_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q_hat, k_hat = _logit_factors(q, k, tau, opts.normalize_input, acc)
        logits = q_hat @ k_hat.transpose(-1, -2)
        out = normalized_poly_attention_ref(logits, v.to(acc), opts.coefficients, mask, opts.causal)
        if opts.output_norm:
            out = out * _output_scale(mask, opts.causal, q.shape, out)
    return out.to(q.dtype)


def taylorshift_attention(
    q: Tensor, k: Tensor, v: Tensor, tau: Tensor, mask: Tensor | None = None, **options: Any
) -> Tensor:
    """TaylorShift with per-head temperatures ``tau`` ``[H]``, on q, k, v already zero at pads; ``options``
    are ``TaylorShiftOptions`` fields (dropout acts whenever it is > 0)."""
    opts = TaylorShiftOptions(**options)
    mode = opts.mode_at(q.shape[2], q.shape[-1], opts.dropout, q.device.type, q.dtype)
    return _taylorshift(q, k, v, tau, mask, opts, mode, opts.dropout)[0]


def taylorshift_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, tau: Tensor, mask: Tensor | None = None, **options: Any
) -> Tensor:
    return _reference(q, k, v, tau, mask, TaylorShiftOptions(**options))


class TaylorShiftAttention(PolynomialAttention):
    """TaylorShift (Nauen et al. 2024); ``**options`` are the fields of ``TaylorShiftOptions``.

    With ``mode='auto'`` and dropout, training pins the mode of the first training call (direct and
    efficient dropout differ) and logs it.
    """

    options_class = TaylorShiftOptions
    options: TaylorShiftOptions

    def __init__(
        self, num_heads: int, head_dim: int, max_len: int, causal: bool = False, **options: Any
    ) -> None:
        super().__init__(num_heads, head_dim, max_len, causal, **options)
        # Only the √(N_v/d) output scale breaks the convex combination.
        self.is_convex = not self.options.output_norm
        self.tau = nn.Parameter(torch.full((num_heads,), float(self.options.tau_init)))
        self.pinned_mode: str | None = None
        self.mode_used: str | None = None

    def key_mask(self, mask: Tensor | None) -> Tensor | None:
        return mask if self.options.mask_padding else None

    def _mode_for(self, seq_len: int, device_kind: str, dtype: torch.dtype, pin: bool = True) -> str:
        """The mode that runs at ``seq_len``; training with dropout under ``auto`` pins it."""
        dropout = self.dropout_now()
        pinning = self.options.mode == "auto" and dropout > 0
        if pinning and self.pinned_mode is not None:
            return self.pinned_mode
        chosen = self.options.mode_at(seq_len, self.head_dim, dropout, device_kind, dtype)
        if pinning and pin:
            self.pinned_mode = chosen
        return chosen

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        mode = self._mode_for(q.shape[2], q.device.type, q.dtype)
        out, self.impl_used = _taylorshift(q, k, v, self.tau, mask, self.options, mode, self.dropout_now())
        self.mode_used = mode
        return out

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return _reference(q, k, v, self.tau, mask, self.options)

    def explicit_weights(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        # The output scale √(N_v/d) is left to apply_weights.
        eye = torch.eye(q.shape[2], dtype=q.dtype, device=q.device)
        return _reference(q, k, eye, self.tau.detach(), mask, replace(self.options, output_norm=False))

    def apply_weights(self, weights: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        out = weights @ v
        scale = _output_scale(mask, self.options.causal, v.shape, out) if self.options.output_norm else 1.0
        return out * scale

    def flops(self, batch: int, heads: int, seq_len: int, head_dim: int) -> float:
        """Per head: direct 4N²d (the softmax count), efficient 4N·d·(d+1)² (non-causal)."""
        if self._mode_for(seq_len, self.tau.device.type, self.tau.dtype, pin=False) == "direct":
            return batch * heads * 4.0 * seq_len**2 * head_dim
        return batch * heads * 4.0 * seq_len * head_dim * (head_dim + 1) ** 2

    def log_values(self) -> dict[str, Any]:
        values = {"mode": self.options.mode, "mode_used": self.mode_used or "unknown", **super().log_values()}
        if self.pinned_mode is not None:
            values["mode_pinned"] = self.pinned_mode
        values.update({f"tau_{head}": float(t) for head, t in enumerate(self.tau.detach().cpu())})
        return values
