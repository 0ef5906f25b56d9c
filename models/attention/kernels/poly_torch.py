"""The non-causal polynomial kernel Σ_j (c + b·(q_i·k_j) + a·(q_i·k_j)²) v_j in PyTorch, forward and
backward by hand, with quadratic features built in cache-sized blocks and never stored. How and why: "The
blocked PyTorch path" in docs/kernels.md. ``models.attention.polynomial`` wraps it in autograd nodes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Elements of a quadratic-feature block (2 MB in fp32): it stays in L2 and in malloc's reused heap.
FEATURE_BLOCK_ELEMENTS = 1 << 19
MIN_BLOCK_ROWS = 256
Coefficients = tuple[float, float, float]  # (a, b, c) of f(s) = c + b·s + a·s²


class Blocking(NamedTuple):
    """``heads`` whole heads per block, or (``heads`` = 1) ``rows`` rows of one head; ``width`` is the widest
    feature row."""

    heads: int
    rows: int
    seq_len: int
    width: int

    def split(self, x: Tensor, row_dim: int = 1) -> list[Tensor]:
        """``x``'s blocks as views (one ``Tensor.split``, much cheaper than slicing block by block)."""
        if self.rows >= self.seq_len:
            return list(x.split(self.heads))
        return [chunk for head in x.split(1) for chunk in head.split(self.rows, dim=row_dim)]

    def per_block(self, x: Tensor) -> list[Tensor]:
        """The head slice of a per-head ``[G, *]`` state that each block reads."""
        if self.rows >= self.seq_len:
            return list(x.split(self.heads))
        return [head for head in x.split(1) for _ in range(-(-self.seq_len // self.rows))]


def blocking(batch_heads: int, seq_len: int, width: int) -> Blocking:
    """Blocks whose ``[heads, rows, width]`` features stay under the budget: whole heads while one fits,
    else row chunks of one head of at least ``MIN_BLOCK_ROWS`` rows. Each block is contiguous, so one bmm."""
    per_head = seq_len * width
    if per_head <= FEATURE_BLOCK_ELEMENTS:
        return Blocking(max(1, min(batch_heads, FEATURE_BLOCK_ELEMENTS // per_head)), seq_len, seq_len, width)
    return Blocking(1, max(1, MIN_BLOCK_ROWS, FEATURE_BLOCK_ELEMENTS // width), seq_len, width)


class _Outer:
    """Row-wise outer products vec(x yᵀ) of blocks, written into one reused workspace (a fresh tensor per
    block costs an allocation and page faults)."""

    def __init__(self, like: Tensor, plan: Blocking) -> None:
        self.workspace = like.new_empty(plan.heads * min(plan.rows, plan.seq_len) * plan.width)
        self.views: dict[torch.Size, Tensor] = {}

    def __call__(self, x_column: Tensor, y_row: Tensor) -> Tensor:
        """``[g, R, m, 1]``, ``[g, R, 1, n]`` -> ``[g, R, m·n]``."""
        shape = torch.Size((*x_column.shape[:-1], y_row.shape[-1]))
        out = self.views.get(shape)
        if out is None:
            out = self.views[shape] = self.workspace[: shape.numel()].view(shape)
        return torch.mul(x_column, y_row, out=out).flatten(-2)


# Tensors are contiguous [G, N, *], G = B·H. S2r [G, d, d·e] is S2 = Σ_j (k_j⊗k_j) v_jᵀ [G, d², e] under a
# free view. With ⊠ the row-wise outer product (docs/kernels.md):
#   S2r = Kᵀ (K⊠V'),  dS2r = a·Qᵀ (Q⊠dY),  dQ = 2a·(Q⊠dY) S2rᵀ,  dK = 2·(K⊠V') dS2rᵀ,
#   Y = a·(Q⊠Q) S2,  dV' = (K⊠K) dS2.
PolySaved = tuple[Tensor | None, Tensor | None]  # S1 [G, d, e] (None when b = 0), S2r (None when a = 0)


def poly_forward(q: Tensor, k: Tensor, v: Tensor, coefficients: Coefficients) -> tuple[Tensor, PolySaved]:
    """c·Σv + b·q·(Kᵀ V) + a·(q⊗q)·S2, ``[G, N, e]``, and the states for backward."""
    (a, b, c), (batch_heads, seq_len, d), value_width = coefficients, q.shape, v.shape[-1]
    s0 = v.sum(dim=1, keepdim=True)  # [G, 1, e]
    s1 = torch.bmm(k.transpose(1, 2), v) if b != 0 else None  # [G, d, e]
    if s1 is None:
        out = (c * s0).expand(batch_heads, seq_len, value_width).contiguous()
    else:
        out = torch.baddbmm(s0, q, s1, beta=c, alpha=b)  # c·S0 + b·q·S1
    s2r = None
    if a != 0:
        plan = blocking(batch_heads, seq_len, d * max(d, value_width))
        outer = _Outer(q, plan)
        s2r = q.new_zeros(batch_heads, d, d * value_width)
        blocks = zip(
            plan.per_block(s2r),
            plan.split(k.transpose(1, 2), 2),
            plan.split(k[..., None]),
            plan.split(v[:, :, None]),
            strict=True,
        )
        for s2r_block, kt, kc, vr in blocks:
            s2r_block.baddbmm_(kt, outer(kc, vr))
        blocks = zip(
            plan.per_block(s2r.view(batch_heads, d * d, value_width)),  # S2
            plan.split(q[..., None]),
            plan.split(q[:, :, None]),
            plan.split(out),
            strict=True,
        )
        for s2, qc, qr, out_block in blocks:
            out_block.baddbmm_(outer(qc, qr), s2, alpha=a)
    return out, (s1, s2r)


def poly_backward(
    q: Tensor, k: Tensor, v: Tensor, saved: PolySaved, grad: Tensor, coefficients: Coefficients
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. q, k, v of ``poly_forward`` for the contiguous output gradient."""
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
        plan = blocking(batch_heads, seq_len, d * max(d, value_width))
        outer = _Outer(q, plan)
        ds2r = torch.zeros_like(s2r)
        blocks = zip(
            plan.per_block(ds2r),
            plan.per_block(s2r.transpose(1, 2)),  # [G, d·e, d]
            plan.split(q.transpose(1, 2), 2),
            plan.split(q[..., None]),
            plan.split(grad[:, :, None]),
            plan.split(dq),
            strict=True,
        )
        for ds2r_block, s2r_t, qt, qc, gr, dq_block in blocks:
            q_grad = outer(qc, gr)  # Q⊠dY
            ds2r_block.baddbmm_(qt, q_grad)
            dq_block.baddbmm_(q_grad, s2r_t, alpha=2 * a)
        ds2r.mul_(a)
        blocks = zip(
            plan.per_block(ds2r.transpose(1, 2)),
            plan.per_block(ds2r.view(batch_heads, d * d, value_width)),
            plan.split(k[..., None]),
            plan.split(k[:, :, None]),
            plan.split(v[:, :, None]),
            plan.split(dk),
            plan.split(dv),
            strict=True,
        )
        for ds2r_t, ds2, kc, kr, vr, dk_block, dv_block in blocks:
            dk_block.baddbmm_(outer(kc, vr), ds2r_t, alpha=2)
            # K⊠K goes into the workspace as well, after the last use of K⊠V' (d² <= d·e elements per row).
            dv_block.baddbmm_(outer(kc, kr), ds2)
    return dq, dk, dv


def fold_heads(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``[B, H, N, *]`` -> contiguous ``[B·H, N, *]``."""
    return tuple(t.reshape(-1, *t.shape[2:]).contiguous() for t in tensors)
