"""Fused Triton polynomial attention out_i = Σ_j (c + b·(q_i·k_j) + a·(q_i·k_j)²) · v_j, non-causal and
unnormalised, with the features formed on chip: the host side (tiles, launches, autograd). The kernels are
in ``poly_triton_jit``; how they work, the tiling, the precision and the cost: ``docs/kernels.md``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from models.attention.kernels.poly_triton_jit import poly_apply_kernel, poly_state_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # the module must import on machines without Triton; calling it then raises
    triton = None
    tl = None

__all__ = ["SUPPORTS_CAUSAL", "poly_kernel_attention_triton", "poly_kernel_flops"]

SUPPORTS_CAUSAL = False  # select_impl routes causal calls to the PyTorch path

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MIN_DOT = 16  # smallest MMA operand extent for 16-bit inputs; d and e are padded to at least this


def poly_kernel_flops(batch: int, heads: int, seq_len: int, head_dim: int, value_dim: int) -> float:
    """Forward matmul FLOPs, 4·N·d·(d+1)·e per head: state and apply each cost 2·N·e per feature (d² + d of
    them, the constant one neglected). Forward + backward ≈ 3× this."""
    return 4.0 * batch * heads * seq_len * head_dim * (head_dim + 1) * value_dim


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _prev_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@dataclass(frozen=True)
class _Config:
    """Tile sizes and dtypes of one call (docs/kernels.md, "Tiling")."""

    d_pad: int
    block_a: int
    block_n_state: int  # MMA reduction extent of the state kernel
    block_n_out: int  # rows per program of the forward apply (OUT only)
    block_n_grad: int  # rows per program of the apply variants that form dx (more live registers)
    e_main: int
    e_tail: int
    has_tail: bool
    e_pad: int
    n_split: int | None
    op_dtype: torch.dtype
    num_warps: int
    num_stages: int


# Defaults per MMA operand size, chosen from sm_90 compiles (ptxas register and shared-memory reports, no
# spills for d <= 64 in bf16), not from timings: (features per block, block_n state / out / grad, warps).
_DEFAULT_TILES = {2: (128, 64, 128, 64, 8), 4: (64, 64, 64, 64, 8), 8: (32, 32, 32, 32, 4)}


def _make_config(
    q: Tensor, v: Tensor, block_n: int | None, block_a: int | None, n_split: int | None
) -> _Config:
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    d_pad = max(_MIN_DOT, _next_pow2(head_dim))
    # fp16 operands would overflow on long-sequence state sums; fp32 operands (tf32 MMA) keep fp32 range.
    op_dtype = torch.float32 if q.dtype == torch.float16 else q.dtype
    features, bn_state, bn_out, bn_grad, num_warps = _DEFAULT_TILES[op_dtype.itemsize]
    if block_a is None:
        block_a = max(1, features // d_pad)
    block_a = min(block_a, _next_pow2(head_dim))
    if block_n is not None:
        bn_state = bn_out = bn_grad = block_n
    for name, value in (("block_n", block_n), ("block_a", block_a), ("n_split", n_split)):
        if value is not None and (value < 1 or (name != "n_split" and value & (value - 1))):
            kind = "an integer >= 1" if name == "n_split" else "a power of two >= 1"
            raise ValueError(f"poly_kernel_attention_triton: {name} must be {kind}, got {value}")
    if block_n is not None and block_n < _MIN_DOT:
        raise ValueError(
            f"poly_kernel_attention_triton: block_n must be >= {_MIN_DOT} (the MMA reduction "
            f"extent), got {block_n}"
        )
    # Power-of-two main part plus a tail of at least _MIN_DOT columns, e.g. e = 65 -> 64 + 16.
    e_main = max(_MIN_DOT, _prev_pow2(value_dim))
    rest = value_dim - e_main
    e_tail = max(_MIN_DOT, _next_pow2(rest)) if rest > 0 else _MIN_DOT
    return _Config(
        d_pad=d_pad,
        block_a=block_a,
        block_n_state=bn_state,
        block_n_out=bn_out,
        block_n_grad=bn_grad,
        e_main=e_main,
        e_tail=e_tail,
        has_tail=rest > 0,
        e_pad=e_main + e_tail if rest > 0 else e_main,
        n_split=n_split,
        op_dtype=op_dtype,
        num_warps=num_warps,
        num_stages=2,
    )


def _kernel_args(dtype: torch.dtype, cfg: _Config, block_n: int) -> dict:
    """Constexprs and launch options shared by both kernels."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # fp32 inputs get exact fp32 products; fp16 inputs (fp32 operands) accept tf32; 16-bit operands ignore it.
    precision = "tf32" if dtype == torch.float16 else "ieee"
    return {
        "D_PAD": cfg.d_pad,
        "BLOCK_A": cfg.block_a,
        "BLOCK_N": block_n,
        "E_MAIN": cfg.e_main,
        "E_TAIL": cfg.e_tail,
        "HAS_TAIL": cfg.has_tail,
        "E_PAD": cfg.e_pad,
        "ACC_DTYPE": acc,
        "OP_DTYPE": getattr(tl, str(cfg.op_dtype).removeprefix("torch.")),
        "INPUT_PRECISION": precision,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def _pad_values(y: Tensor, cfg: _Config) -> Tensor:
    """[BH, N, e] -> contiguous [BH, N, E_PAD], zero beyond e (16-byte aligned rows)."""
    if y.shape[-1] == cfg.e_pad:
        return y.contiguous()
    return torch.nn.functional.pad(y, (0, cfg.e_pad - y.shape[-1]))


def _state(x: Tensor, y: Tensor, cfg: _Config) -> Tensor:
    """T = Σ_n [x_n⊗x_n, x_n, 1]ᵀ y_n per head, [BH, d² + d + 1, E_PAD] in the MMA operand dtype."""
    bh, seq_len, head_dim = x.shape
    n_quad_blocks = triton.cdiv(head_dim, cfg.block_a)
    n_tiles = max(1, triton.cdiv(seq_len, cfg.block_n_state))
    n_split = cfg.n_split
    if n_split is None:
        n_split = 1
        if x.is_cuda:
            # Split N only when (B·H)·(feature blocks) cannot give two programs per SM; keep >= 8 tiles each.
            target = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
            n_split = max(1, min(triton.cdiv(target, bh * (n_quad_blocks + 1)), n_tiles // 8))
    tiles_per_split = triton.cdiv(n_tiles, min(n_split, n_tiles))
    n_split = triton.cdiv(n_tiles, tiles_per_split)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_rows = head_dim * head_dim + head_dim + 1
    partial = torch.empty(bh, n_split, n_rows, cfg.e_pad, device=x.device, dtype=acc_dtype)
    poly_state_kernel[(bh, n_quad_blocks + 1, n_split)](
        x, y, partial, seq_len, head_dim, tiles_per_split, **_kernel_args(x.dtype, cfg, cfg.block_n_state)
    )
    state = partial[:, 0] if n_split == 1 else partial.sum(dim=1)
    return state.to(cfg.op_dtype).contiguous()


def _apply(
    x: Tensor,
    y: Tensor | None,
    state: Tensor,
    coefs: tuple[float, float, float],
    cfg: _Config,
    value_dim: int,
    compute_out: bool,
    compute_dx: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """OUT = a·φ₂(x)T2 + b·xT1 + c·T0 ([BH, N, e]) and/or DX = a·(G + Gᵀ)x + b·yT1ᵀ ([BH, N, d])."""
    bh, seq_len, head_dim = x.shape
    out = x.new_empty(bh, seq_len, value_dim) if compute_out else None
    dx = torch.empty_like(x) if compute_dx else None
    block_n = cfg.block_n_grad if compute_dx else cfg.block_n_out
    # Unused pointers still need a tensor; the constexpr flags keep the kernel from touching them.
    poly_apply_kernel[(bh, triton.cdiv(seq_len, block_n))](
        x,
        y if y is not None else x,
        state,
        out if out is not None else x,
        dx if dx is not None else x,
        seq_len,
        head_dim,
        value_dim,
        *coefs,
        COMPUTE_OUT=compute_out,
        COMPUTE_DX=compute_dx,
        **_kernel_args(x.dtype, cfg, block_n),
    )
    return out, dx


class _PolyKernelAttention(torch.autograd.Function):
    """Autograd wrapper: forward = state(k, v) then apply(q); backward as in docs/kernels.md."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, coefs: tuple[float, float, float], cfg: _Config
    ) -> Tensor:
        batch, heads, seq_len, head_dim = q.shape
        value_dim = v.shape[-1]
        q3, k3 = (t.reshape(batch * heads, seq_len, head_dim) for t in (q, k))
        v3 = _pad_values(v.reshape(batch * heads, seq_len, value_dim), cfg)
        state = _state(k3, v3, cfg)
        out, _ = _apply(q3, None, state, coefs, cfg, value_dim, compute_out=True, compute_dx=False)
        ctx.save_for_backward(q3, k3, v3, state)
        ctx.coefs, ctx.cfg, ctx.shape = coefs, cfg, (batch, heads, seq_len, head_dim, value_dim)
        return out.view(batch, heads, seq_len, value_dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        q3, k3, v3, state = ctx.saved_tensors
        batch, heads, seq_len, head_dim, value_dim = ctx.shape
        cfg, coefs = ctx.cfg, ctx.coefs
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dout3 = _pad_values(dout.to(q3.dtype).reshape(batch * heads, seq_len, value_dim), cfg)
        dq = dk = dv = None
        if need_q:
            _, dq = _apply(q3, dout3, state, coefs, cfg, value_dim, compute_out=False, compute_dx=True)
            dq = dq.view(batch, heads, seq_len, head_dim)
        if need_k or need_v:
            dstate = _state(q3, dout3, cfg)
            dv, dk = _apply(k3, v3, dstate, coefs, cfg, value_dim, compute_out=need_v, compute_dx=need_k)
            dv = dv.view(batch, heads, seq_len, value_dim) if need_v else None
            dk = dk.view(batch, heads, seq_len, head_dim) if need_k else None
        return dq, dk, dv, None, None


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, coefs: tuple[float, float, float]) -> None:
    name = "poly_kernel_attention_triton"
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {label} must be [B, H, N, D], got shape {tuple(t.shape)}")
    if q.shape != k.shape:
        raise ValueError(
            f"{name}: q and k must have the same shape [B, H, N, d], got {tuple(q.shape)} "
            f"and {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{name}: v must be [B, H, N, e] with the B, H, N of q, got {tuple(v.shape)} "
            f"for q {tuple(q.shape)}"
        )
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"{name}: head and value dims must be >= 1, got d={q.shape[-1]}, e={v.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
            f"cast them before the call"
        )
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: dtype {q.dtype} is not supported; use one of {[str(d) for d in _SUPPORTED_DTYPES]}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    interpreted = type(poly_state_kernel).__name__ == "InterpretedFunction"
    if q.device.type != "cuda" and not interpreted:
        raise ValueError(
            f"{name}: needs CUDA tensors (got device {q.device}); to run on CPU set "
            f"TRITON_INTERPRET=1 before triton is first imported (slow, for tests only)"
        )
    if not all(math.isfinite(x) for x in coefs):
        raise ValueError(f"{name}: a, b, c must be finite, got {coefs}")


# Opaque to torch.compile (one graph break): the work is already fused, and the host code picks tiles and
# splits from shapes and device properties.
@torch.compiler.disable
def poly_kernel_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: float,
    b: float,
    c: float,
    causal: bool = False,
    *,
    block_n: int | None = None,
    block_a: int | None = None,
    n_split: int | None = None,
) -> Tensor:
    """Σ_j (c + b·(q_i·k_j) + a·(q_i·k_j)²) v_j for q, k ``[B, H, N, d]``, v ``[B, H, N, e]``, unnormalised.

    One dtype among fp16, bf16, fp32, fp64; CUDA tensors, or CPU under ``TRITON_INTERPRET=1``. ``causal``
    raises ``NotImplementedError``. ``block_n`` (rows of an N tile, a power of two >= 16), ``block_a`` (α rows
    per feature block) and ``n_split`` (splits of N in the state reduction) override ``_DEFAULT_TILES`` and
    the split that fills the GPU. Returns the input dtype, differentiable once.
    """
    if triton is None:
        raise RuntimeError(
            "poly_kernel_attention_triton needs Triton, which is not installed; "
            "install it (pip install 'lra-harness[triton]') or use the PyTorch implementation"
        )
    coefs = (float(a), float(b), float(c))
    _check_inputs(q, k, v, coefs)
    if causal:
        raise NotImplementedError(
            "poly_kernel_attention_triton: causal=True is not implemented in the fused kernel; use the "
            "PyTorch implementation (models.attention.polynomial) for causal attention"
        )
    if q.shape[2] == 0:
        # Nothing to launch; an empty product keeps autograd connected.
        return v * 0.0 + 0.0 * (q.sum() + k.sum())
    cfg = _make_config(q, v, block_n, block_a, n_split)
    # Triton launches on the current device; the backward runs on autograd's per-device thread.
    with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
        return _PolyKernelAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), coefs, cfg)
