"""The non-causal polynomial kernel in PyTorch, forward and backward written by hand.

Σ_j (c + b·(q_i·k_j) + a·(q_i·k_j)²) v_j for ``[B·H, N, *]`` tensors, with quadratic features built in
cache-sized blocks and never stored (docs/kernels.md). ``models.attention.polynomial`` wraps these functions
in autograd nodes and holds the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of a quadratic-feature block held at once (1 MB in fp32): small enough to stay in a core's L2 cache
# between the multiply that builds it and the matmul that reads it, and to be served from malloc's reused heap
# rather than fresh mmap pages (the measurements behind the number: docs/kernels.md).
FEATURE_BLOCK_ELEMENTS = 1 << 18
MIN_BLOCK_ROWS = 256
Coefficients = tuple[float, float, float]  # (a, b, c) of f(s) = c + b·s + a·s²


def _row_blocks(shape: torch.Size, features: int, min_rows: int = 1) -> list[slice]:
    """Slices over N such that a ``[B, H, rows, features]`` block stays under the element budget (or holds
    ``min_rows`` rows, whichever is more)."""
    batch_heads, seq_len = shape[0] * shape[1], shape[2]
    rows = max(1, min_rows, FEATURE_BLOCK_ELEMENTS // max(1, batch_heads * features))
    return [slice(start, min(start + rows, seq_len)) for start in range(0, seq_len, rows)]


def _blocks(batch_heads: int, seq_len: int, width: int) -> list[tuple[slice, slice]]:
    """(heads, rows) slices of a ``[B·H, N, *]`` tensor whose ``[heads, rows, width]`` feature block stays
    under the element budget.

    Whole heads are grouped while one head fits, otherwise one head is cut into row chunks of at least
    ``MIN_BLOCK_ROWS`` rows (fewer rows make the state products, which contract over them, inefficient at
    large d, where the d×d·e state is re-read per block). Either way the
    slice of a contiguous ``[B·H, N, *]`` tensor is itself contiguous, so every block is one bmm that writes
    its output in place (a strided block makes CPU ``baddbmm_`` fall back to one addmm per matrix).
    """
    per_head = seq_len * width
    if per_head <= FEATURE_BLOCK_ELEMENTS:
        heads = max(1, FEATURE_BLOCK_ELEMENTS // per_head)
        return [
            (slice(g, min(g + heads, batch_heads)), slice(0, seq_len)) for g in range(0, batch_heads, heads)
        ]
    rows = _row_blocks(torch.Size((1, 1, seq_len)), width, MIN_BLOCK_ROWS)
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


# The non-causal torch path, written out by hand (``poly_forward``/``poly_backward``) so that it never
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


def poly_forward(q: Tensor, k: Tensor, v: Tensor, coefficients: Coefficients) -> tuple[Tensor, PolySaved]:
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


def poly_backward(
    q: Tensor, k: Tensor, v: Tensor, saved: PolySaved, grad: Tensor, coefficients: Coefficients
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. q, k, v of ``poly_forward``, for the contiguous output gradient ``[G, N, e]``."""
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


def fold_heads(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``[B, H, N, *]`` -> contiguous ``[B·H, N, *]``."""
    return tuple(t.reshape(-1, *t.shape[2:]).contiguous() for t in tensors)
