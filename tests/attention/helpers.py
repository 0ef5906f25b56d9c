"""Inputs shared by the TaylorShift and Fastmax tests."""

import torch

F64 = torch.float64
D = 4  # the head size these tests use


def random_qkv(batch, heads, seq_len, dim=D, dtype=F64, seed=42):
    """Seeded q, k, v of shape ``[batch, heads, seq_len, dim]``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq_len, dim, generator=gen, dtype=dtype) for _ in range(3)]


def zero_pads(tensors, mask):
    """The tensors with their rows at pads (``mask`` False) set to zero, as the attention base class does."""
    keep = mask[:, None, :, None]
    return [torch.where(keep, t, torch.zeros_like(t)) for t in tensors]


def real_rows(out, mask):
    """The entries of ``out`` at real query positions (the caller zeroes the others)."""
    return out if mask is None else out[mask[:, None, :, None].expand_as(out)]


def padded_with_garbage(q, k, v, pads=6):
    """q, k, v followed by ``pads`` huge random tokens on the sequence axis, and the mask that marks them."""
    batch, heads, seq_len, dim = q.shape
    garbage = [1e4 * t for t in random_qkv(batch, heads, pads, dim, seed=7)]
    padded = [torch.cat([t, g], dim=2) for t, g in zip((q, k, v), garbage, strict=True)]
    mask = torch.ones(batch, seq_len + pads, dtype=torch.bool)
    mask[:, seq_len:] = False
    return padded, mask
