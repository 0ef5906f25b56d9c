"""Performer attention: FAVOR+ positive orthogonal random features (Choromanski et al., ICLR 2021,
arXiv 2009.14794)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from models.attention.base import Attention, accumulation_dtype, require


def orthogonal_random_features(num_features: int, head_dim: int, generator: torch.Generator) -> Tensor:
    """The FAVOR+ projection W ``[m, d]`` (float64, CPU) from ``generator`` alone: rows orthogonal within
    each block of d, each with the norm of a fresh Gaussian d-vector, so every row is marginally N(0, I_d)."""
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        basis, triangular = torch.linalg.qr(gaussian)
        # Scaling by sign(diag R) makes the basis Haar-distributed instead of tied to QR's sign convention.
        basis = basis * torch.sign(torch.diagonal(triangular))
        blocks.append(basis.T)
    rows = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
    return rows * norms[:, None]


def _scaled_logits(x: Tensor, projection: Tensor) -> tuple[Tensor, Tensor]:
    """Wx and ‖x‖²/2 for x scaled by d^(-1/4), so that φ(q)·φ(k) estimates exp(q·k/√d)."""
    x = x * x.shape[-1] ** -0.25
    return x @ projection.T, 0.5 * x.pow(2).sum(-1, keepdim=True)  # [B, H, N, m], [B, H, N, 1]


def _query_features(q: Tensor, projection: Tensor, eps: float) -> Tensor:
    """φ(q) with the per-row max of Wq subtracted; a per-row factor cancels in the row normalisation."""
    logits, half_sq_norm = _scaled_logits(q, projection)
    row_max = logits.amax(dim=-1, keepdim=True)
    return (torch.exp(logits - half_sq_norm - row_max) + eps) / math.sqrt(projection.shape[0])


def performer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    eps: float = 1e-4,
    chunk_size: int = 64,
) -> Tensor:
    """FAVOR+ attention φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1), linear in N, with W = ``projection`` ``[m, D]``.

    φ(x) = (exp(Wx − ‖x‖²/2 − max) + eps)/√m with x = input/d^{1/4}; the query max is per query row, the
    key max over the real keys each query sees, per (batch, head). Padded keys get φ(k) = 0 and v = 0.
    ``eps`` is added after the exp (before the 1/√m, so its weight does not depend on m); ``chunk_size``
    keys per step of the causal prefix sum. Returns q's dtype.
    """
    out_dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    # Under autocast the feature matmuls would drop back to bf16/fp16.
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, projection = (t.to(acc) for t in (q, k, v, projection))
        query_features = _query_features(q, projection, eps)  # [B, H, N, m]
        key_logits, key_half_sq_norm = _scaled_logits(k, projection)
        row_max = key_logits.amax(dim=-1)  # max_f (W k_j)_f, [B, H, N]
        real = None if mask is None else mask[:, None, :, None]  # [B, 1, N, 1]
        if mask is not None:
            row_max = row_max.masked_fill(~mask[:, None, :], float("-inf"))  # pads never set the stabiliser
            v = torch.where(real, v, v.new_zeros(()))
        if causal:
            key_exponent = key_logits - key_half_sq_norm
            out = _causal_favor(query_features, key_exponent, row_max, v, real, eps, chunk_size)
        else:
            key_max = row_max.amax(dim=-1)[..., None, None]  # [B, H, 1, 1]
            exponent = key_logits - key_half_sq_norm - key_max
            # Masking the exponent (not the exp) keeps a pad's exp(-max) from overflowing into a NaN gradient.
            if real is not None:
                exponent = exponent.masked_fill(~real, float("-inf"))
            key_features = (torch.exp(exponent) + eps) * (1.0 / math.sqrt(projection.shape[0]))
            if real is not None:
                key_features = key_features.masked_fill(~real, 0.0)
            kv_state = key_features.transpose(-1, -2) @ v  # [B, H, m, D]
            normaliser = key_features.sum(dim=-2)[..., None]  # [B, H, m, 1]
            out = (query_features @ kv_state) / (query_features @ normaliser)
    return out.to(out_dtype)


def _causal_favor(
    query_features: Tensor,
    key_exponent: Tensor,
    row_max: Tensor,
    v: Tensor,
    real: Tensor | None,
    eps: float,
    chunk_size: int,
) -> Tensor:
    """Causal FAVOR+ with the running max over real keys j ≤ i as the key stabiliser of query i.

    A sequence-global key max would leak the future (through eps it does not cancel). Query i instead uses
    M_i = max_{j ≤ i} row_max_j, so φ_i(k_j) = (e_j·exp(M_j − M_i) + eps)/√m with e_j = exp(k̃_j − M_j). The
    state is kept at the scale of the last key seen and rescaled by exp(M_old − M_new) ≤ 1, as in online
    softmax; every exponent is ≤ 0, so nothing overflows. ``key_exponent`` is Wk − ‖k‖²/2, ``row_max`` is
    -inf at pads, ``v`` is zero at pads.
    """
    batch, heads, seq_len, num_features = query_features.shape
    running_max = row_max.cummax(dim=-1).values
    # Leading pads have seen no real key yet (-inf); give them the first finite value, which keeps M
    # non-decreasing and finite. Their keys are zeroed below, so the value itself does not matter.
    first_finite = running_max.masked_fill(running_max.isinf(), float("inf")).amin(dim=-1, keepdim=True)
    running_max = torch.where(running_max.isinf(), first_finite, running_max)
    exponent = key_exponent - running_max[..., None]
    if real is not None:
        exponent = exponent.masked_fill(~real, float("-inf"))
    key_scaled = torch.exp(exponent) / math.sqrt(num_features)  # e_j/√m, [B, H, N, m]

    state = v.new_zeros(batch, heads, num_features, v.shape[-1])
    state_sum = v.new_zeros(batch, heads, num_features, 1)
    state_max = running_max[..., :1]  # [B, H, 1]
    causal_block = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=v.device).tril()
    numerators, denominators = [], []
    for start in range(0, seq_len, chunk_size):
        chunk = slice(start, start + chunk_size)
        feats_q, keys, values, chunk_max = (
            query_features[..., chunk, :],
            key_scaled[..., chunk, :],
            v[..., chunk, :],
            running_max[..., chunk],
        )
        size = chunk_max.shape[-1]
        decay = torch.exp(state_max - chunk_max)[..., None]  # [B, H, C, 1]
        # exp(M_j − M_i) for j ≤ i inside the chunk; -inf above the diagonal gives exactly 0.
        gap = (chunk_max[..., None, :] - chunk_max[..., :, None]).masked_fill(
            ~causal_block[:size, :size], float("-inf")
        )
        weights = (feats_q @ keys.transpose(-1, -2)) * torch.exp(gap)  # [B, H, C, C]
        numerators.append((feats_q @ state) * decay + weights @ values)
        denominators.append((feats_q @ state_sum) * decay + weights.sum(dim=-1, keepdim=True))
        end_max = chunk_max[..., -1:]
        carry = torch.exp(state_max - end_max)[..., None]  # [B, H, 1, 1]
        keys_at_end = keys * torch.exp(chunk_max - end_max)[..., None]
        state = state * carry + keys_at_end.transpose(-1, -2) @ values
        state_sum = state_sum * carry + keys_at_end.sum(dim=-2)[..., None]
        state_max = end_max
    numerator = torch.cat(numerators, dim=-2)
    denominator = torch.cat(denominators, dim=-2)

    # The eps part of φ_i(k_j) does not depend on the stabiliser: plain prefix sums over real keys.
    query_total = query_features.sum(dim=-1, keepdim=True)  # [B, H, N, 1]
    real_count = torch.ones_like(v[..., :1]) if real is None else real.to(v.dtype).expand_as(v[..., :1])
    eps_term = eps / math.sqrt(num_features) * query_total
    numerator = numerator + eps_term * v.cumsum(dim=-2)
    denominator = denominator + eps_term * real_count.cumsum(dim=-2)
    # A query preceded only by pads (left padding) has an empty sum; its row is zeroed by the caller.
    denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return numerator / denominator


def performer_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    eps: float = 1e-4,
) -> Tensor:
    """The same estimator with an explicit N×N matrix φ(q_i)·φ_i(k_j), normalised per row.

    The key stabiliser M_i is the max over the keys query i sees, so key features depend on the query; built
    per (query, key) pair they would take ``[B, H, N, N, m]``. Instead exp(l_jf − h_j − M_i) is split as
    exp(l_jf − h_j − r_j)·exp(r_j − M_i) with r_j = max_f l_jf ≤ M_i, so both factors stay ≤ 1 in size.
    """
    out_dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    q, k, projection = q.to(acc), k.to(acc), projection.to(acc)
    query_features = _query_features(q, projection, eps)  # [B, H, N, m]
    key_logits, key_half_sq_norm = _scaled_logits(k, projection)  # [B, H, N, m], [B, H, N, 1]
    row_max = key_logits.amax(dim=-1)  # r_j, [B, H, N]
    batch, _, seq_len, _ = q.shape
    visible = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril()
    visible = visible.expand(batch, 1, seq_len, seq_len)
    if mask is not None:
        visible = visible & mask[:, None, None, :]  # [B, 1, N, N]
    # M_i = max over the keys query i sees of r_j: [B, H, N, 1].
    stabiliser = row_max[:, :, None, :].masked_fill(~visible, float("-inf")).amax(dim=-1, keepdim=True)
    key_part = torch.exp(key_logits - key_half_sq_norm - row_max[..., None])  # [B, H, N, m]
    scale = torch.exp((row_max[:, :, None, :] - stabiliser).masked_fill(~visible, float("-inf")))
    exp_scores = (query_features @ key_part.transpose(-1, -2)) * scale  # [B, H, N, N]
    eps_scores = eps * query_features.sum(dim=-1, keepdim=True)  # [B, H, N, 1]
    scores = torch.where(visible, exp_scores + eps_scores, exp_scores.new_zeros(()))
    scores = scores / math.sqrt(projection.shape[0])
    row_sum = scores.sum(dim=-1, keepdim=True)
    weights = scores / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return (weights @ v.to(acc)).to(out_dtype)


class PerformerAttention(Attention):
    """FAVOR+ random-feature attention (Choromanski et al., "Rethinking Attention with Performers", 2021).

    W is a checkpointed buffer shared by the layer's heads, redrawn every ``redraw_interval`` training calls
    (``None`` or 0: never), never in eval. Draw r is seeded by (``seed``, r), so the seed and the redraw
    count (both checkpointed) determine it. ``num_features`` m defaults to ⌊d ln d⌋. ``seed=None`` draws the
    seed from torch's global RNG, like an initial weight (different per layer); an integer gives every layer
    the same features.
    """

    is_convex = True

    def __init__(
        self,
        *args: Any,
        num_features: int | None = None,
        redraw_interval: int | None = 1000,
        eps: float = 1e-4,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if num_features is None:
            num_features = max(1, int(self.head_dim * math.log(self.head_dim)))
        require(
            num_features >= 1,
            f"performer: num_features must be >= 1 (or null for d ln d), got {num_features}",
        )
        require(
            redraw_interval is None or redraw_interval >= 0,
            f"performer: redraw_interval must be >= 0 (0 or null = never), got {redraw_interval}",
        )
        require(eps > 0, f"performer: eps must be > 0 to keep the normaliser positive, got {eps}")
        self.eps = eps
        self.num_features = num_features
        self.redraw_interval = redraw_interval or 0
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
        self.redraws = 0
        self.calls_since_redraw = 0
        self.register_buffer("projection", self._draw(0).to(torch.float32))

    def _draw(self, redraw_index: int) -> Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + redraw_index) % 2**63)
        return orthogonal_random_features(self.num_features, self.head_dim, generator)

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw the next W. Assigned, not copied in place: a graph that has not run backward yet (the two
        encoder passes of retrieval) still holds the old W."""
        self.redraws += 1
        self.calls_since_redraw = 0
        self.projection = self._draw(self.redraws).to(self.projection)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if self.training:
            if self.redraw_interval and self.calls_since_redraw >= self.redraw_interval:
                self.redraw_features()
            self.calls_since_redraw += 1
        return performer_attention(q, k, v, self.projection, mask, self.causal, self.eps)

    def reference(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return performer_attention_ref(q, k, v, self.projection, mask, self.causal, self.eps)

    def flops(self, batch: int, heads: int, seq_len: int, head_dim: int) -> float:
        return 8.0 * batch * heads * seq_len * self.num_features * head_dim

    def log_values(self) -> dict[str, Any]:
        return {
            "num_features": self.num_features,
            "redraw_interval": self.redraw_interval,
            "redraws": self.redraws,
        }

    def get_extra_state(self) -> dict[str, int]:
        return {"seed": self.seed, "redraws": self.redraws, "calls_since_redraw": self.calls_since_redraw}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.seed = state["seed"]
        self.redraws = state["redraws"]
        self.calls_since_redraw = state["calls_since_redraw"]
