"""Polynomial-kernel attention, shared by TaylorShift (arXiv 2403.02920) and Fastmax (arXiv 2402.07901).

out_i = Σ_j f(q_i·k_j) v_j with f(x) = c + b·x + a·x², over all j or j ≤ i (causal), factorises through the
states Σ_j v_j, Σ_j k_j v_jᵀ and Σ_j (k_j⊗k_j) v_jᵀ in O(N·d²·e), never building an N×N matrix.
``normalized_poly_attention`` appends the denominator column to v, so one kernel call yields numerator and
denominator. The implementations are described in ``docs/kernels.md``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from models.attention.base import Attention, accumulation_dtype
from models.attention.kernels import triton_module
from models.attention.kernels.poly_torch import Coefficients, fold_heads, poly_backward, poly_forward

# Σ v, Σ k vᵀ (None when b = 0), Σ (k⊗k) vᵀ (None when a = 0).
States = tuple[Tensor, Tensor | None, Tensor | None]
# q⊗q, k⊗k given explicitly instead of built by the kernel (torch only: Fastmax's feature dropout).
QuadFeatures = tuple[Tensor, Tensor]


class Augmentation(NamedTuple):
    """V' = [first, V]/divisor with zero rows where ``mask`` ``[B, N]`` is False; ``first`` (the denominator
    column) and ``divisor`` are ``[B, 1, 1, 1]``, ``divisor`` and ``mask`` may be None."""

    first: Tensor
    divisor: Tensor | None
    mask: Tensor | None


def poly_kernel_attention(
    q: Tensor, k: Tensor, v: Tensor, a: float, b: float, c: float, causal: bool = False
) -> Tensor:
    """Σ_j (c + b·(q_i·k_j) + a·(q_i·k_j)²) v_j for q, k ``[B, H, N, d]``, v ``[B, H, N, e]``, in PyTorch.

    States accumulate in fp32 (fp64 for fp64 inputs); ``a == 0`` skips the quadratic term. Returns q's dtype.
    """
    _check_shapes(q, k, v)
    acc = accumulation_dtype(q.dtype)
    # Under autocast the state matmuls would fall back to bf16/fp16.
    with torch.autocast(q.device.type, enabled=False):
        coefficients = (float(a), float(b), float(c))
        out = run_poly_kernel("torch", q.to(acc), k.to(acc), v.to(acc), coefficients, causal, acc)
    return out.to(q.dtype)


def poly_kernel_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, a: float, b: float, c: float, causal: bool = False
) -> Tensor:
    """The same sum with an explicit N×N kernel matrix: the oracle of the factorised forms."""
    _check_shapes(q, k, v)
    acc = accumulation_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        weights = _explicit_weights(q.to(acc) @ k.to(acc).transpose(-1, -2), (a, b, c), None, causal)
        return (weights @ v.to(acc)).to(q.dtype)


def normalized_poly_attention_ref(
    logits: Tensor, v: Tensor, coefficients: Coefficients, mask: Tensor | None, causal: bool
) -> Tensor:
    """Σ_j m_j f(x_ij) v_j / Σ_j m_j f(x_ij) from explicit logits ``[B, H, N, N]``."""
    weights = _explicit_weights(logits, coefficients, mask, causal)
    return weights @ v / weights.sum(dim=-1, keepdim=True)


def _explicit_weights(
    logits: Tensor, coefficients: Coefficients, mask: Tensor | None, causal: bool
) -> Tensor:
    """f(x_ij), zero at pad keys (``mask`` ``[B, N]`` False) and, when causal, above the diagonal."""
    a, b, c = coefficients
    weights = c + b * logits + a * logits.square()
    if mask is not None:
        weights = torch.where(mask[:, None, None, :], weights, weights.new_zeros(()))
    return weights.tril() if causal else weights


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "poly_kernel_attention: expected q, k of shape [B, H, N, d] and v of shape "
            f"[B, H, N, e]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def quadratic_features(x: Tensor) -> Tensor:
    """Row-wise vec(x xᵀ): ``[..., N, d] -> [..., N, d²]``, so that (x⊗x)·(y⊗y) = (x·y)²."""
    return (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)


def poly_states(k: Tensor, v: Tensor, coefficients: Coefficients, k_quad: Tensor | None = None) -> States:
    """(Σ v, Σ k vᵀ, Σ (k⊗k) vᵀ) under plain autograd."""
    a, b, _ = coefficients
    s0 = v.sum(dim=-2, keepdim=True)
    s1 = k.transpose(-1, -2) @ v if b != 0 else None
    s2 = None
    if a != 0:
        features = quadratic_features(k) if k_quad is None else k_quad
        s2 = features.transpose(-1, -2) @ v
    return s0, s1, s2


def poly_readout(
    q: Tensor, states: States, coefficients: Coefficients, q_quad: Tensor | None = None
) -> Tensor:
    """c·S0 + b·q·S1 + a·(q⊗q)·S2 for states from ``poly_states``."""
    (a, b, c), (s0, s1, s2) = coefficients, states
    out = (c * s0).expand(*q.shape[:-1], s0.shape[-1])
    if s1 is not None:
        out = out + b * (q @ s1)
    if s2 is not None:
        features = quadratic_features(q) if q_quad is None else q_quad
        out = out + a * (features @ s2)
    return out


class _PolyKernel(torch.autograd.Function):
    """Non-causal ``kernels.poly_torch``, ``[B, H, N, *]`` in and out; never saves an N×d² tensor."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, a: float, b: float, c: float) -> Tensor:  # noqa: ANN001
        shape = q.shape
        q, k, v = fold_heads(q, k, v)
        out, (s1, s2r) = poly_forward(q, k, v, (a, b, c))
        ctx.save_for_backward(q, k, v, s1, s2r)
        ctx.coefficients, ctx.input_shape = (a, b, c), shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        q, k, v, s1, s2r = ctx.saved_tensors
        (grad,) = fold_heads(grad_out)
        dq, dk, dv = poly_backward(q, k, v, (s1, s2r), grad, ctx.coefficients)
        shape = ctx.input_shape
        return dq.view(shape), dk.view(shape), dv.view(*shape[:-1], dv.shape[-1]), None, None, None


class _PolyRatio(torch.autograd.Function):
    """``split_ratio(poly_kernel(q, k, augmented_values(v, augmentation)))``, non-causal, as one autograd
    node whose backward chains the gradients by hand; the ``Augmentation`` gets no gradient.

    The ratio's gradient: dnum = dY/den, dden = -Σ_e dY·Y/den (0 where a zero denominator was replaced by 1).
    """

    @staticmethod
    def forward(  # noqa: ANN001
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        first: Tensor,
        divisor: Tensor | None,
        mask: Tensor | None,
        a: float,
        b: float,
        c: float,
    ) -> Tensor:
        shape = v.shape
        with torch.no_grad():
            v_aug, factor = _augment(v, Augmentation(first, divisor, mask))
        q, k, v_aug = fold_heads(q, k, v_aug)
        out_aug, (s1, s2r) = poly_forward(q, k, v_aug, (a, b, c))
        denominator, nonzero = _denominator(out_aug)
        out = out_aug[..., 1:] / denominator
        ctx.save_for_backward(q, k, v_aug, s1, s2r, out, denominator, nonzero, factor)
        ctx.coefficients, ctx.output_shape = (a, b, c), shape
        return out.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        q, k, v_aug, s1, s2r, out, denominator, nonzero, factor = ctx.saved_tensors
        shape = ctx.output_shape
        (grad,) = fold_heads(grad_out)
        grad_aug = torch.empty_like(v_aug)
        torch.div(grad, denominator, out=grad_aug[..., 1:])
        grad_den = (grad_aug[..., 1:] * out).sum(dim=-1, keepdim=True).neg_()
        grad_aug[..., :1] = torch.where(nonzero, grad_den, grad_den.new_zeros(()))
        dq, dk, dv_aug = poly_backward(q, k, v_aug, (s1, s2r), grad_aug, ctx.coefficients)
        # V' = [first, v]·factor (1/divisor, 0 at pads): chain through the copy and the row factor.
        dv = dv_aug[..., 1:].unflatten(0, shape[:2])
        dv = dv * factor if factor is not None else dv.contiguous()
        qk_shape = (*shape[:-1], q.shape[-1])
        return dq.view(qk_shape), dk.view(qk_shape), dv, None, None, None, None, None, None


def _causal_poly(
    q: Tensor, k: Tensor, v: Tensor, coefficients: Coefficients, q_quad: Tensor | None, k_quad: Tensor | None
) -> Tensor:
    """Prefix-sum form, chunked over N: an explicit lower-triangular C×C kernel inside a chunk, the exclusive
    prefix sum of the earlier chunks' states across them (docs/kernels.md)."""
    (a, b, c), (seq_len, d) = coefficients, q.shape[2:]
    quadratic = a != 0
    explicit_features = q_quad is not None
    if quadratic and not explicit_features:
        q_quad, k_quad = quadratic_features(q), quadratic_features(k)
    features = q_quad.shape[-1] if quadratic else d
    # C balances the in-chunk kernel (N·C) against the chunk states (N/C · F·e).
    balanced = 2 ** round(math.log2(math.sqrt(features * v.shape[-1])))
    chunk = max(1, min(seq_len, max(16, min(512, balanced))))
    n_chunks = -(-seq_len // chunk)
    pad = n_chunks * chunk - seq_len

    def chunked(x: Tensor) -> Tensor:
        return F.pad(x, (0, 0, 0, pad)).unflatten(2, (n_chunks, chunk))  # [B, H, n_chunks, C, width]

    qc, kc, vc = chunked(q), chunked(k), chunked(v)
    scores = qc @ kc.transpose(-1, -2)  # [B, H, n_chunks, C, C]
    kernel = c + b * scores
    if quadratic and explicit_features:
        kernel = kernel + a * (chunked(q_quad) @ chunked(k_quad).transpose(-1, -2))
    elif quadratic:
        kernel = kernel + a * scores.square()
    positions = torch.arange(chunk, device=q.device)
    causal_mask = positions[:, None] >= positions[None, :]
    out = torch.where(causal_mask, kernel, kernel.new_zeros(())) @ vc

    if n_chunks > 1:

        def earlier_chunks(state: Tensor) -> Tensor:  # exclusive prefix sum over chunks
            return F.pad(state[:, :, :-1].cumsum(dim=2), (0, 0, 0, 0, 1, 0))

        inter = c * earlier_chunks(vc.sum(dim=-2, keepdim=True))
        if b != 0:
            inter = inter + b * (qc @ earlier_chunks(kc.transpose(-1, -2) @ vc))
        if quadratic:
            k_state = earlier_chunks(chunked(k_quad).transpose(-1, -2) @ vc)  # [B, H, n_chunks, F, e]
            inter = inter + a * (chunked(q_quad) @ k_state)
        out = out + inter
    return out.flatten(2, 3)[:, :, :seq_len]


def run_poly_kernel(
    impl: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coefficients: Coefficients,
    causal: bool,
    model_dtype: torch.dtype,
    quad_features: QuadFeatures | None = None,
) -> Tensor:
    """The resolved impl on q, k, v in the accumulation dtype; returns that dtype."""
    if impl == "triton":
        # The kernel reads operands in the model dtype, except fp16, whose range V' = [α·1, V]/N_v leaves at
        # long N (and the kernel uses fp32 operands for fp16 anyway).
        dtype = torch.float32 if model_dtype == torch.float16 else model_dtype
        kernel = triton_module()[0].poly_kernel_attention_triton
        return kernel(q.to(dtype), k.to(dtype), v.to(dtype), *coefficients, causal=causal).to(q.dtype)
    q_quad, k_quad = (None, None) if quad_features is None else quad_features
    if causal:
        return _causal_poly(q, k, v, coefficients, q_quad, k_quad)
    if quad_features is None:
        return _PolyKernel.apply(q, k, v, *coefficients)
    return poly_readout(q, poly_states(k, v, coefficients, k_quad), coefficients, q_quad)


def augmented_values(v: Tensor, augmentation: Augmentation) -> Tensor:
    """V' = [first, V]/divisor, ``[B, H, N, e + 1]``, zero at pads: one kernel call on it yields numerator
    (columns 1:) and denominator (column 0), as in linear attention (Katharopoulos et al. 2020)."""
    return _augment(v, augmentation)[0]


def _augment(v: Tensor, augmentation: Augmentation) -> tuple[Tensor, Tensor | None]:
    """V' and the factor on its rows: 1/divisor, and 0 at pads (None: neither). A multiply, not a select: V
    is already zero at pads (selected, so no NaN), and one multiply is a third of a division and a select."""
    first, divisor, mask = augmentation
    factor = None if mask is None else mask[:, None, :, None].to(v.dtype)
    if divisor is not None:
        factor = 1 / divisor if factor is None else factor / divisor
    v_aug = torch.cat([first.expand(*v.shape[:-1], 1).to(v.dtype), v], dim=-1)
    return (v_aug if factor is None else v_aug * factor), factor


def _denominator(out_aug: Tensor) -> tuple[Tensor, Tensor]:
    """Column 0 of a kernel output on V' with 0 (no real key) replaced by 1, and where it was not 0."""
    denominator = out_aug[..., :1]
    nonzero = denominator != 0
    return torch.where(nonzero, denominator, torch.ones_like(denominator)), nonzero


def split_ratio(out_aug: Tensor) -> Tensor:
    """Numerator over denominator of a kernel output on ``augmented_values``."""
    return out_aug[..., 1:] / _denominator(out_aug)[0]


def normalized_poly_attention(
    impl: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    augmentation: Augmentation,
    coefficients: Coefficients,
    causal: bool,
    model_dtype: torch.dtype,
    quad_features: QuadFeatures | None = None,
) -> Tensor:
    """Σ_j f(q_i·k_j) v_j / Σ_j f(q_i·k_j) over the real keys: ``split_ratio`` of ``run_poly_kernel`` on
    ``augmented_values``; one autograd node (``_PolyRatio``) on the non-causal torch path."""
    first, divisor, _ = augmentation
    fused = impl == "torch" and not causal and quad_features is None
    if fused and not first.requires_grad and (divisor is None or not divisor.requires_grad):
        # autograd.Function tracks only top-level tensor arguments.
        return _PolyRatio.apply(q, k, v, *augmentation, *coefficients)
    v_aug = augmented_values(v, augmentation)
    out_aug = run_poly_kernel(impl, q, k, v_aug, coefficients, causal, model_dtype, quad_features)
    return split_ratio(out_aug)


class PolynomialAttention(Attention):
    """TaylorShift's and Fastmax's module side: the options object (``options_class`` built from
    ``**options`` and ``causal``) and the kernel implementation that ran last."""

    options_class: ClassVar[type]

    def __init__(
        self, num_heads: int, head_dim: int, max_len: int, causal: bool = False, **options: Any
    ) -> None:
        super().__init__(num_heads, head_dim, max_len, causal)
        self.options = self.options_class(causal=causal, **options)
        self.impl_used: str | None = None

    def dropout_now(self) -> float:
        return self.options.dropout if self.training else 0.0

    def log_values(self) -> dict[str, Any]:
        return {"impl": self.options.impl, "impl_used": self.impl_used or "unknown"}
