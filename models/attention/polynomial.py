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
# Elements of a quadratic-feature block held at once by the non-causal path: 1 MB in fp32, far below the full
# N×d² tensors (tobna/TaylorShift stores both: 4.2 GB at N = 16k, d = 64). A block that small stays in a
# core's L2 cache between the multiply that builds it and the matmul that reads it, and in malloc's reused
# heap: whole-tensor temporaries of tens of MB are served by fresh mmap pages on every call (glibc's mmap
# threshold is at most 32 MB), whose page faults made the time grow faster than N (4.5x from 8k to 16k
# tokens at d = 16). Measured on a 2 MB-L2 Xeon in fp32: 2^18 beat 2^16-2^17 by 15-30% and 2^19-2^20 by 15%
# at d = 16, N = 513.
_FEATURE_BLOCK_ELEMENTS = 1 << 18
_MIN_BLOCK_ROWS = 256
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


def _row_blocks(shape: torch.Size, features: int, min_rows: int = 1) -> list[slice]:
    """Slices over N such that a ``[B, H, rows, features]`` block stays under the element budget (or holds
    ``min_rows`` rows, whichever is more)."""
    batch_heads, seq_len = shape[0] * shape[1], shape[2]
    rows = max(1, min_rows, _FEATURE_BLOCK_ELEMENTS // max(1, batch_heads * features))
    return [slice(start, min(start + rows, seq_len)) for start in range(0, seq_len, rows)]


def _blocks(batch_heads: int, seq_len: int, width: int) -> list[tuple[slice, slice]]:
    """(heads, rows) slices of a ``[B·H, N, *]`` tensor whose ``[heads, rows, width]`` feature block stays
    under the element budget.

    Whole heads are grouped while one head fits, otherwise one head is cut into row chunks of at least
    ``_MIN_BLOCK_ROWS`` rows (fewer rows make the state products, which contract over them, inefficient at
    large d, where the d×d·e state is re-read per block). Either way the
    slice of a contiguous ``[B·H, N, *]`` tensor is itself contiguous, so every block is one bmm that writes
    its output in place (a strided block makes CPU ``baddbmm_`` fall back to one addmm per matrix).
    """
    per_head = seq_len * width
    if per_head <= _FEATURE_BLOCK_ELEMENTS:
        heads = max(1, _FEATURE_BLOCK_ELEMENTS // per_head)
        return [
            (slice(g, min(g + heads, batch_heads)), slice(0, seq_len)) for g in range(0, batch_heads, heads)
        ]
    rows = _row_blocks(torch.Size((1, 1, seq_len)), width, _MIN_BLOCK_ROWS)
    return [(slice(g, g + 1), row_slice) for g in range(batch_heads) for row_slice in rows]


def _feature_blocks(q: Tensor, value_width: int) -> tuple[list[tuple[slice, slice]], Tensor]:
    """The blocks of ``_blocks`` for q ``[G, N, d]``'s feature blocks (q⊠q, k⊠v', ...: up to d·max(d, e)
    wide), and one flat workspace that holds the largest of them.

    Every feature block of a pass is written into the workspace: a fresh tensor per block would cost an
    allocation and first-touch page faults each time (a third of the time of the multiply that fills it).
    """
    batch_heads, seq_len, d = q.shape
    width = d * max(d, value_width)
    blocks = _blocks(batch_heads, seq_len, width)
    largest = max((h.stop - h.start) * (r.stop - r.start) for h, r in blocks)
    return blocks, q.new_empty(largest * width)


def _outer_rows(x: Tensor, y: Tensor, workspace: Tensor) -> Tensor:
    """Row-wise vec(x yᵀ): ``[G, R, m]``, ``[G, R, n] -> [G, R, m·n]``, written into ``workspace``."""
    out = workspace[: x.numel() * y.shape[-1]].view(*x.shape, y.shape[-1])
    return torch.mul(x.unsqueeze(-1), y.unsqueeze(-2), out=out).flatten(-2)


# The non-causal torch path, written out by hand (``_poly_forward``/``_poly_backward``) so that it never
# stores an N×d² tensor and runs every quadratic product as one matmul with a wide contraction. Heads are
# folded into one batch axis G = B·H and every tensor is a contiguous ``[G, N, *]``. The quadratic state is
# kept as S2r ``[G, d, d·e]`` with S2r[m, (n, e)] = Σ_j k_jm k_jn v_je, which is S2 = Σ_j (k_j⊗k_j) v_jᵀ
# ``[G, d², e]`` under a free view and is symmetric in (m, n). With ⊠ the row-wise outer product:
#   S2r = Kᵀ (K⊠V')  and  dS2r = a·Qᵀ (Q⊠dY)         (contraction over tokens);
#   dQ = 2a·(Q⊠dY) S2rᵀ  and  dK = 2·(K⊠V') dS2rᵀ     (contraction over d·e: d/dx Σ_mn G_mn x_m x_n = 2Gx
#                                                        for a symmetric G, so no d×d gradient is contracted
#                                                        token by token);
#   Y = a·(Q⊠Q) S2  and  dV' = (K⊠K) dS2              (contraction over d²).
# Feature blocks (``_blocks``) stay in cache and are rebuilt in backward instead of saved: a rebuild costs one
# multiply per element, while reading a saved N×d² tensor back costs a trip to memory.
PolySaved = tuple[Tensor | None, Tensor | None]  # S1 [G, d, e] (None when b = 0), S2r (None when a = 0)


def _poly_forward(q: Tensor, k: Tensor, v: Tensor, coefficients: Coefficients) -> tuple[Tensor, PolySaved]:
    """c·Σv + b·q·(Kᵀ V) + a·(q⊗q)·S2 for contiguous ``[G, N, *]`` inputs: ``[G, N, e]`` and the states."""
    (a, b, c), (batch_heads, seq_len, d), value_width = coefficients, q.shape, v.shape[-1]
    s0 = v.sum(dim=1, keepdim=True)  # [G, 1, e]
    s1 = torch.bmm(k.transpose(1, 2), v) if b != 0 else None  # [G, d, e]
    if s1 is None:
        out = (c * s0).expand(batch_heads, seq_len, value_width).contiguous()
    else:
        out = torch.baddbmm(s0, q, s1, beta=c, alpha=b)  # c·S0 + b·q·S1
    s2r = None
    if a != 0:
        s2r = q.new_zeros(batch_heads, d, d * value_width)
        blocks, workspace = _feature_blocks(q, value_width)
        for heads, rows in blocks:
            k_block = k[heads, rows]
            s2r[heads].baddbmm_(k_block.transpose(1, 2), _outer_rows(k_block, v[heads, rows], workspace))
        s2 = s2r.view(batch_heads, d * d, value_width)
        for heads, rows in blocks:
            q_block = q[heads, rows]
            out[heads, rows].baddbmm_(_outer_rows(q_block, q_block, workspace), s2[heads], alpha=a)
    return out, (s1, s2r)


def _poly_backward(
    q: Tensor, k: Tensor, v: Tensor, saved: PolySaved, grad: Tensor, coefficients: Coefficients
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. q, k, v of ``_poly_forward``, for the contiguous output gradient ``[G, N, e]``."""
    (a, b, c), (s1, s2r) = coefficients, saved
    (batch_heads, seq_len, d), value_width = q.shape, v.shape[-1]
    # The constant term gives every key the same value gradient c·Σ_i dY_i.
    grad_sum = grad.sum(dim=1, keepdim=True)
    if s1 is not None:
        ds1 = torch.bmm(q.transpose(1, 2), grad)  # [G, d, e], without the factor b
        dq = torch.bmm(grad, s1.transpose(1, 2)).mul_(b)
        dk = torch.bmm(v, ds1.transpose(1, 2)).mul_(b)
        dv = torch.baddbmm(grad_sum, k, ds1, beta=c, alpha=b)
    else:
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        dv = (c * grad_sum).expand(batch_heads, seq_len, value_width).contiguous()
    if s2r is not None:
        ds2r = torch.zeros_like(s2r)
        s2r_t = s2r.transpose(1, 2)  # [G, d·e, d]
        blocks, workspace = _feature_blocks(q, value_width)
        for heads, rows in blocks:
            q_block = q[heads, rows]
            q_grad = _outer_rows(q_block, grad[heads, rows], workspace)  # Q⊠dY
            ds2r[heads].baddbmm_(q_block.transpose(1, 2), q_grad)
            dq[heads, rows].baddbmm_(q_grad, s2r_t[heads], alpha=2 * a)
        ds2r.mul_(a)
        ds2r_t, ds2 = ds2r.transpose(1, 2), ds2r.view(batch_heads, d * d, value_width)
        for heads, rows in blocks:
            k_block = k[heads, rows]
            k_value = _outer_rows(k_block, v[heads, rows], workspace)
            dk[heads, rows].baddbmm_(k_value, ds2r_t[heads], alpha=2)
            # K⊠K goes into the workspace as well, after the last use of K⊠V' (d² <= d·e elements per row).
            dv[heads, rows].baddbmm_(_outer_rows(k_block, k_block, workspace), ds2[heads])
    return dq, dk, dv


def _fold_heads(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``[B, H, N, *]`` -> contiguous ``[B·H, N, *]``."""
    return tuple(t.reshape(-1, *t.shape[2:]).contiguous() for t in tensors)


class _PolyKernel(torch.autograd.Function):
    """Non-causal factorised polynomial attention, ``[B, H, N, *]`` in and out (see ``_poly_forward``).

    Saved for backward: q, k, v and the states S1 (d×e), S2r (d×d·e); never an N×d² tensor.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, a: float, b: float, c: float) -> Tensor:  # noqa: ANN001
        shape = q.shape
        q, k, v = _fold_heads(q, k, v)
        out, (s1, s2r) = _poly_forward(q, k, v, (a, b, c))
        ctx.save_for_backward(q, k, v, s1, s2r)
        ctx.coefficients, ctx.input_shape = (a, b, c), shape
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        q, k, v, s1, s2r = ctx.saved_tensors
        (grad,) = _fold_heads(grad_out)
        dq, dk, dv = _poly_backward(q, k, v, (s1, s2r), grad, ctx.coefficients)
        shape = ctx.input_shape
        return dq.view(shape), dk.view(shape), dv.view(*shape[:-1], dv.shape[-1]), None, None, None


class _PolyRatio(torch.autograd.Function):
    """``split_ratio(poly_kernel(q, k, augmented_values(v, first, divisor, mask)))``, non-causal, as one
    autograd node: building V', the kernel and the ratio run without recording a graph, and the backward
    chains their gradients by hand. ``first`` and ``divisor`` are mask statistics and get no gradient.

    The ratio's gradient at row i: dnum = dY/den, dden = -Σ_e dY·Y/den (0 where the denominator was 0 and
    replaced by 1, as ``split_ratio`` does).
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
            v_aug = augmented_values(v, first, divisor, mask)
        q, k, v_aug = _fold_heads(q, k, v_aug)
        out_aug, (s1, s2r) = _poly_forward(q, k, v_aug, (a, b, c))
        denominator = out_aug[..., :1]
        nonzero = denominator != 0
        denominator = torch.where(nonzero, denominator, torch.ones_like(denominator))
        out = out_aug[..., 1:] / denominator
        ctx.save_for_backward(q, k, v_aug, s1, s2r, out, denominator, nonzero, divisor, mask)
        ctx.coefficients, ctx.output_shape = (a, b, c), shape
        return out.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        q, k, v_aug, s1, s2r, out, denominator, nonzero, divisor, mask = ctx.saved_tensors
        shape = ctx.output_shape
        (grad,) = _fold_heads(grad_out)
        grad_aug = torch.empty_like(v_aug)
        torch.div(grad, denominator, out=grad_aug[..., 1:])
        grad_den = (grad_aug[..., 1:] * out).sum(dim=-1, keepdim=True).neg_()
        grad_aug[..., :1] = torch.where(nonzero, grad_den, grad_den.new_zeros(()))
        dq, dk, dv_aug = _poly_backward(q, k, v_aug, (s1, s2r), grad_aug, ctx.coefficients)
        # V' = [first, v]/divisor with zero rows at pads: chain through the copy, the division, the select.
        dv = dv_aug[..., 1:].unflatten(0, shape[:2])
        dv = dv / divisor if divisor is not None else dv.contiguous()
        if mask is not None:
            dv = torch.where(mask[:, None, :, None], dv, dv.new_zeros(()))
        qk_shape = (*shape[:-1], q.shape[-1])
        return dq.view(qk_shape), dk.view(qk_shape), dv, None, None, None, None, None, None


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


def normalized_poly_attention(
    impl: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    first: Tensor,
    divisor: Tensor | None,
    mask: Tensor | None,
    coefficients: Coefficients,
    causal: bool,
    model_dtype: torch.dtype,
    q_quad: Tensor | None = None,
    k_quad: Tensor | None = None,
) -> Tensor:
    """Σ_j f(q_i·k_j) v_j / Σ_j f(q_i·k_j) over the real keys: ``split_ratio`` of ``run_poly_kernel`` on
    ``augmented_values(v, first, divisor, mask)``, ``[B, H, N, e]``.

    The non-causal torch path is one autograd node (``_PolyRatio``), which saves the graph of the V'
    construction and the ratio (about ten full-size elementwise passes per call); the other paths compose
    the three steps. ``first`` and ``divisor`` are mask statistics without gradient.
    """
    fused = impl == "torch" and not causal and q_quad is None and k_quad is None
    if fused and not first.requires_grad and (divisor is None or not divisor.requires_grad):
        return _PolyRatio.apply(q, k, v, first, divisor, mask, *coefficients)
    v_aug = augmented_values(v, first, divisor, mask)
    out_aug = run_poly_kernel(impl, q, k, v_aug, coefficients, causal, model_dtype, q_quad, k_quad)
    return split_ratio(out_aug)
