"""Polynomial-kernel attention, shared by TaylorShift (arXiv 2403.02920) and Fastmax (arXiv 2402.07901).

    out_i = Σ_j f(q_i·k_j) v_j,   f(x) = c + b·x + a·x²,

unnormalised, over all j or over j ≤ i (causal). Because f(q·k) = φ(q)·φ(k) with
φ(x) = [√c, √b·x, √a·vec(x xᵀ)], the sum factorises into states Σ_j v_j, Σ_j k_j v_jᵀ and
Σ_j (k_j⊗k_j) v_jᵀ, so the cost is O(N·d²·e) and no N×N matrix is ever built. Callers normalise q, k and
append a ones column to v themselves (the denominator trick), so one call yields numerator and denominator.

The fused Triton kernel ``models/attention/kernels/poly_triton.py::poly_kernel_attention_triton`` has the
same signature; ``select_impl`` and ``run_poly_kernel`` at the bottom choose between it and this PyTorch path.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from models.attention.base import accumulation_dtype, zero_pads

IMPLS = ("auto", "torch", "triton")
_TRITON_MODULE = "models.attention.kernels.poly_triton"
_TRITON_FUNCTION = "poly_kernel_attention_triton"
# Elements of an [N, d²] feature block held at once by the non-causal path (256 MB in fp32), so that forward
# and backward never hold both full N×d² tensors (tobna/TaylorShift stores both: 4.2 GB at N = 16k, d = 64).
_FEATURE_BLOCK_ELEMENTS = 1 << 26
# (a, b, c) of f(s) = c + b·s + a·s².
Coefficients = tuple[float, float, float]
# Σ v, Σ k vᵀ (None when b = 0), Σ (k⊗k) vᵀ (None when a = 0).
States = tuple[Tensor, Tensor | None, Tensor | None]


def poly_kernel_attention(
    q: Tensor, k: Tensor, v: Tensor, a: float, b: float, c: float, causal: bool = False
) -> Tensor:
    """Factorised Σ_j (c + b·(q_i·k_j) + a·(q_i·k_j)²) v_j in O(N·d²·e), never forming an N×N matrix.

    States accumulate in fp32 (fp64 for fp64 inputs). The non-causal backward recomputes the quadratic
    features instead of storing them; the causal form works in chunks with an explicit in-chunk kernel and
    exclusive prefix sums of the per-chunk states, so N×d²×e is never materialised.

    Args:
        q, k: ``[B, H, N, d]``.
        v: ``[B, H, N, e]``; ``e`` may differ from ``d`` (callers pass the augmented ``V' = [α·1, V]``
            with zeroed rows at padded keys).
        a, b, c: kernel coefficients; ``a == 0`` skips the quadratic term (Fastmax order 1).
        causal: sum over ``j ≤ i`` only.

    Returns:
        ``[B, H, N, e]`` in ``q``'s dtype.
    """
    _check_shapes(q, k, v)
    acc = accumulation_dtype(q.dtype)
    # Under autocast the state matmuls would fall back to bf16/fp16; they must stay in `acc`.
    with torch.autocast(q.device.type, enabled=False):
        coefficients = (float(a), float(b), float(c))
        out = run_poly_kernel("torch", q.to(acc), k.to(acc), v.to(acc), coefficients, causal, acc)
    return out.to(q.dtype)


def poly_kernel_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, a: float, b: float, c: float, causal: bool = False
) -> Tensor:
    """The same sum with an explicit N×N kernel matrix (the oracle for the factorised forms).

    Args:
        q, k: ``[B, H, N, d]``; v: ``[B, H, N, e]``.
        a, b, c: kernel coefficients of f(x) = c + b·x + a·x².
        causal: sum over ``j ≤ i`` only.

    Returns:
        ``[B, H, N, e]`` in ``q``'s dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    _check_shapes(q, k, v)
    acc = accumulation_dtype(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        x = q.to(acc) @ k.to(acc).transpose(-1, -2)  # [B, H, N, N]
        weights = c + b * x + a * x.square()
        if causal:
            weights = weights.tril()
        return (weights @ v.to(acc)).to(q.dtype)


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
    """States (Σ v [B,H,1,e], Σ k vᵀ [B,H,d,e], Σ (k⊗k) vᵀ [B,H,F,e]) under plain autograd."""
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
    """c·S0 + b·q·S1 + a·(q⊗q)·S2 for states from ``poly_states``: ``[B, H, N, e]``."""
    (a, b, c), (s0, s1, s2) = coefficients, states
    out = (c * s0).expand(*q.shape[:-1], s0.shape[-1])
    if s1 is not None:
        out = out + b * (q @ s1)
    if s2 is not None:
        features = quadratic_features(q) if q_quad is None else q_quad
        out = out + a * (features @ s2)
    return out


def _row_blocks(shape: torch.Size, features: int) -> list[slice]:
    """Slices over N such that a ``[B, H, rows, features]`` block stays under the element budget."""
    batch_heads, seq_len = shape[0] * shape[1], shape[2]
    rows = max(1, _FEATURE_BLOCK_ELEMENTS // max(1, batch_heads * features))
    return [slice(start, min(start + rows, seq_len)) for start in range(0, seq_len, rows)]


class _PolyKernel(torch.autograd.Function):
    """Non-causal factorised polynomial attention whose backward recomputes the quadratic features.

    Saved for backward: q, k, v and the states S1 (d×e), S2 (d²×e); never an N×d² tensor.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, a: float, b: float, c: float) -> Tensor:  # noqa: ANN001
        d = q.shape[-1]
        blocks = _row_blocks(q.shape, d * d)
        s0 = v.sum(dim=-2, keepdim=True)  # [B, H, 1, e]
        out = (c * s0).expand(*q.shape[:-1], v.shape[-1]).clone()
        s1 = s2 = None
        if b != 0:
            s1 = k.transpose(-1, -2) @ v  # [B, H, d, e]
            out.add_(q @ s1, alpha=b)
        if a != 0:
            s2 = sum(
                quadratic_features(k[..., rows, :]).transpose(-1, -2) @ v[..., rows, :] for rows in blocks
            )  # [B, H, d², e]
            for rows in blocks:
                out[..., rows, :].add_(quadratic_features(q[..., rows, :]) @ s2, alpha=a)
        ctx.save_for_backward(q, k, v, s1, s2)
        ctx.coefficients = (a, b, c)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        q, k, v, s1, s2 = ctx.saved_tensors
        a, b, c = ctx.coefficients
        d = q.shape[-1]
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k)
        # The constant term gives every key the same value gradient c·Σ_i dout_i.
        dv = (c * grad_out.sum(dim=-2, keepdim=True)).expand_as(v).clone()
        if s1 is not None:
            ds1 = b * (q.transpose(-1, -2) @ grad_out)  # [B, H, d, e]
            dq.add_(grad_out @ s1.transpose(-1, -2), alpha=b)
            dk.add_(v @ ds1.transpose(-1, -2))
            dv.add_(k @ ds1)
        if s2 is not None:
            blocks = _row_blocks(q.shape, d * d)
            ds2 = a * sum(
                quadratic_features(q[..., rows, :]).transpose(-1, -2) @ grad_out[..., rows, :]
                for rows in blocks
            )  # [B, H, d², e]
            for rows in blocks:
                q_rows, k_rows = q[..., rows, :], k[..., rows, :]
                dv[..., rows, :].add_(quadratic_features(k_rows) @ ds2)
                # d(x⊗x)/dx contracts a d×d gradient G into (G + Gᵀ)·x.
                grad_q_quad = (grad_out[..., rows, :] @ s2.transpose(-1, -2)).unflatten(-1, (d, d))
                grad_k_quad = (v[..., rows, :] @ ds2.transpose(-1, -2)).unflatten(-1, (d, d))
                dq[..., rows, :].add_(_contract_outer_grad(grad_q_quad, q_rows), alpha=a)
                dk[..., rows, :].add_(_contract_outer_grad(grad_k_quad, k_rows))
        return dq, dk, dv, None, None, None


def _contract_outer_grad(grad: Tensor, x: Tensor) -> Tensor:
    """Gradient of Σ_mn G_mn x_m x_n w.r.t. x: (G + Gᵀ)·x, for G ``[..., N, d, d]`` and x ``[..., N, d]``."""
    return (grad @ x.unsqueeze(-1) + grad.transpose(-1, -2) @ x.unsqueeze(-1)).squeeze(-1)


def _causal_chunk_size(seq_len: int, features: int, value_width: int) -> int:
    """Chunk length balancing the in-chunk kernel (N·C) against the chunk states (N/C · F·e)."""
    balanced = 2 ** round(math.log2(math.sqrt(features * value_width)))
    return max(1, min(seq_len, max(16, min(512, balanced))))


def _causal_poly(
    q: Tensor, k: Tensor, v: Tensor, coefficients: Coefficients, q_quad: Tensor | None, k_quad: Tensor | None
) -> Tensor:
    """Prefix-sum form of the polynomial attention, chunked over N.

    Inside a chunk the kernel is an explicit lower-triangular C×C matrix; across chunks each query reads the
    exclusive prefix sum of the earlier chunks' states. Padding N up to a multiple of C appends keys after
    every real query, so the causal mask already hides them.
    """
    (a, b, c), (seq_len, d) = coefficients, q.shape[2:]
    quadratic = a != 0
    explicit_features = q_quad is not None
    if quadratic and not explicit_features:
        q_quad, k_quad = quadratic_features(q), quadratic_features(k)
    features = q_quad.shape[-1] if quadratic else d
    chunk = _causal_chunk_size(seq_len, features, v.shape[-1])
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

        def earlier_chunks(state: Tensor) -> Tensor:
            """Exclusive prefix sum over the chunk axis."""
            return F.pad(state[:, :, :-1].cumsum(dim=2), (0, 0, 0, 0, 1, 0))

        inter = c * earlier_chunks(vc.sum(dim=-2, keepdim=True))
        if b != 0:
            inter = inter + b * (qc @ earlier_chunks(kc.transpose(-1, -2) @ vc))
        if quadratic:
            k_state = earlier_chunks(chunked(k_quad).transpose(-1, -2) @ vc)  # [B, H, n_chunks, F, e]
            inter = inter + a * (chunked(q_quad) @ k_state)
        out = out + inter
    return out.flatten(2, 3)[:, :, :seq_len]


_triton_state: tuple[ModuleType | None, str] | None = None


def _triton_module() -> tuple[ModuleType | None, str]:
    """The Triton kernel module, or None and the reason it cannot be used.

    Imported lazily, so the project imports without triton; the answer is cached in a module global (not
    ``functools.lru_cache``, which torch.compile does not honour).
    """
    global _triton_state
    if _triton_state is None:
        _triton_state = _load_triton_module()
    return _triton_state


@torch.compiler.disable
def _load_triton_module() -> tuple[ModuleType | None, str]:
    try:
        importlib.import_module("triton")
    except ImportError as err:
        return None, f"triton is not installed ({err})"
    try:
        module = importlib.import_module(_TRITON_MODULE)
    except ImportError as err:
        return None, f"the kernel module {_TRITON_MODULE} cannot be imported ({err})"
    if not callable(getattr(module, _TRITON_FUNCTION, None)):
        return None, f"{_TRITON_MODULE} defines no {_TRITON_FUNCTION}"
    return module, ""


def select_impl(impl: str, q: Tensor, causal: bool = False, torch_only: str | None = None) -> str:
    """Resolve ``auto | torch | triton`` to the implementation that runs: ``"torch"`` or ``"triton"``.

    ``torch_only`` names a feature of this call that the kernel cannot express (e.g. feature dropout);
    ``auto`` then falls back to torch, while an explicit ``triton`` raises. The kernel runs causal inputs
    only if its module sets ``SUPPORTS_CAUSAL = True``.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
    if impl == "torch" or (impl == "auto" and not q.is_cuda):
        return "torch"
    module, why = _triton_module()
    if torch_only is None and causal and module is not None and not getattr(module, "SUPPORTS_CAUSAL", False):
        torch_only = "causal attention (the kernel module does not set SUPPORTS_CAUSAL = True)"
    if impl == "auto":
        return "triton" if module is not None and torch_only is None else "torch"
    if module is None:
        raise RuntimeError(f"impl='triton' is unavailable: {why}. Use impl='torch' or impl='auto'.")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors, got device {q.device}; use impl='torch', "
            "or set TRITON_INTERPRET=1 to run the kernel in Triton's CPU interpreter"
        )
    if torch_only is not None:
        raise ValueError(
            f"impl='triton' cannot run {torch_only}; use impl='auto' (falls back to torch for "
            "this case) or impl='torch'"
        )
    return "triton"


def run_poly_kernel(
    impl: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    coefficients: Coefficients,
    causal: bool,
    model_dtype: torch.dtype,
    q_quad: Tensor | None = None,
    k_quad: Tensor | None = None,
) -> Tensor:
    """Run the resolved impl on q, k, v held in the accumulation dtype; returns that dtype.

    ``coefficients`` is (a, b, c); ``q_quad, k_quad`` replace q⊗q, k⊗k (torch only: Fastmax's feature
    dropout). The torch path takes the tensors as they are. The Triton kernel reads operands in the model
    dtype (bf16 tensor cores), except fp16: V' = [α·1, V]/N_v drops below fp16's normal range at long N, and
    the kernel uses fp32 operands for fp16 anyway, so fp16 models hand it fp32.
    """
    if impl == "triton":
        module, _ = _triton_module()
        dtype = torch.float32 if model_dtype == torch.float16 else model_dtype
        kernel = getattr(module, _TRITON_FUNCTION)
        return kernel(q.to(dtype), k.to(dtype), v.to(dtype), *coefficients, causal=causal).to(q.dtype)
    if causal:
        return _causal_poly(q, k, v, coefficients, q_quad, k_quad)
    if q_quad is None and k_quad is None:
        # The memory-saving autograd function: it never stores an N×d² tensor.
        return _PolyKernel.apply(q, k, v, *coefficients)
    return poly_readout(q, poly_states(k, v, coefficients, k_quad), coefficients, q_quad)


def augmented_values(v: Tensor, first: Tensor, divisor: Tensor | None, mask: Tensor | None) -> Tensor:
    """V' = [first, V]/divisor, ``[B, H, N, e + 1]``, with zero rows at pads.

    One kernel call on V' yields the numerator (columns 1:) and the denominator (column 0) of a normalised
    polynomial attention (the denominator trick of linear attention, Katharopoulos et al., 2020). Zeroing a
    pad's whole row, first entry included, removes it from both.
    """
    v_aug = torch.cat([first.expand(*v.shape[:-1], 1).to(v.dtype), v], dim=-1)
    if divisor is not None:
        v_aug = v_aug / divisor
    return v_aug if mask is None else zero_pads((v_aug,), mask)[0]


def split_ratio(out_aug: Tensor) -> Tensor:
    """Numerator over denominator of a kernel output on ``augmented_values``; a zero denominator (a row that
    sees no real key, zeroed by the caller) divides by 1."""
    denominator = out_aug[..., :1]
    return out_aug[..., 1:] / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
