import math

import pytest
import torch

from models.attention.performer import (
    PerformerAttention,
    orthogonal_random_features,
    performer_attention,
    performer_attention_ref,
)
from models.attention.softmax import softmax_attention_ref

F64 = torch.float64


def random_qkv(batch, heads, seq_len, head_dim, dtype=F64, scale=1.0, seed=42):
    generator = torch.Generator().manual_seed(seed)
    return [
        scale * torch.randn(batch, heads, seq_len, head_dim, generator=generator, dtype=dtype) for _ in "qkv"
    ]


def right_padded_mask(batch, seq_len):
    """Sequence b keeps seq_len - 2b real tokens (at least one)."""
    lengths = torch.tensor([max(1, seq_len - 2 * b) for b in range(batch)])
    return torch.arange(seq_len)[None, :] < lengths[:, None]


def features(num_features, head_dim, seed=0):
    return orthogonal_random_features(num_features, head_dim, torch.Generator().manual_seed(seed))


def real_rows(out, mask):
    """Output rows at real query positions (the caller zeroes the others)."""
    if mask is None:
        return out
    return out.masked_fill(~mask[:, None, :, None], 0.0)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize(
    "batch, heads, seq_len, head_dim, num_features",
    [(2, 3, 13, 8, 12), (1, 2, 63, 16, 32), (2, 1, 1, 4, 5)],
    ids=lambda x: str(x),
)
def test_matches_ref(batch, heads, seq_len, head_dim, num_features, masked, causal):
    q, k, v = (t.requires_grad_() for t in random_qkv(batch, heads, seq_len, head_dim))
    projection = features(num_features, head_dim)
    mask = right_padded_mask(batch, seq_len) if masked else None
    upstream = torch.randn(batch, heads, seq_len, head_dim, dtype=F64)
    results = []
    # A small chunk makes the causal path cross several chunk boundaries, one of them partial.
    for attention in (lambda *a, **kw: performer_attention(*a, chunk_size=5, **kw), performer_attention_ref):
        out = real_rows(attention(q, k, v, projection, mask, causal=causal), mask)
        grads = torch.autograd.grad(out, (q, k, v), upstream)
        results.append((out, *grads))
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gradcheck(causal):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 1, 5, 3))
    projection = features(5, 3)
    mask = torch.tensor([[True, True, True, True, False]])

    def attend(q, k, v):
        return real_rows(performer_attention(q, k, v, projection, mask, causal=causal, chunk_size=2), mask)

    assert torch.autograd.gradcheck(attend, (q, k, v))


def test_fp32_matches_fp64():
    q, k, v = random_qkv(2, 2, 257, 16)
    projection = features(64, 16)
    mask = right_padded_mask(2, 257)
    ref = real_rows(performer_attention(q, k, v, projection, mask), mask)
    low = performer_attention(q.float(), k.float(), v.float(), projection.float(), mask)
    assert low.dtype == torch.float32
    assert (real_rows(low.double(), mask) - ref).abs().max() <= 5e-5 * ref.abs().max()


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_autocast_keeps_fp32_states(causal):
    """Mixed-precision training must not push the feature matmuls and states back to bf16."""
    q, k, v = random_qkv(1, 2, 33, 16, dtype=torch.float32)
    projection = features(64, 16).float()
    full = performer_attention(q, k, v, projection, causal=causal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = performer_attention(q, k, v, projection, causal=causal)
    torch.testing.assert_close(mixed, full, atol=1e-5, rtol=1e-5)


def test_left_padding_causal_is_finite():
    """A query preceded only by pads has an empty prefix sum; forward and backward must stay finite."""
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 2, 9, 4))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    out = real_rows(performer_attention(q, k, v, features(6, 4), mask, causal=True, chunk_size=4), mask)
    out.sum().backward()
    assert all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))
    ref = real_rows(performer_attention_ref(q, k, v, features(6, 4), mask, causal=True), mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_large_inputs_stay_finite():
    q, k, v = random_qkv(1, 2, 33, 8, dtype=torch.float32, scale=30.0)
    out = performer_attention(q, k, v, features(16, 8).float())
    assert torch.isfinite(out).all()


def test_orthogonal_blocks():
    head_dim = 8
    projection = features(20, head_dim)
    assert projection.shape == (20, head_dim)
    for start in range(0, 20, head_dim):
        block = projection[start : start + head_dim]
        unit = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.T, torch.eye(len(block), dtype=F64), atol=1e-12, rtol=0)
    # Row norms are chi-distributed, not all equal to √d.
    assert projection.norm(dim=1).std() > 0.1


@pytest.mark.parametrize("head_dim, expected", [(32, 110), (64, 266), (128, 621)])
def test_default_num_features(head_dim, expected):
    assert PerformerAttention(1, head_dim, 16).num_features == expected


def test_approximates_softmax():
    """Loose and seeded: the estimator's error against exact softmax falls as m grows."""
    q, k, v = random_qkv(2, 2, 64, 16, scale=0.5)
    exact = softmax_attention_ref(q, k, v)
    errors = []
    for num_features in (64, 256, 1024):
        trials = [
            (performer_attention(q, k, v, features(num_features, 16, seed)) - exact).pow(2).mean()
            for seed in range(3)
        ]
        errors.append(torch.stack(trials).mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5 * errors[0]
    assert errors[2] < 1e-3


def test_redraw_every_interval_training_calls_only():
    module = PerformerAttention(2, 4, 16, redraw_interval=3, seed=7)
    q, k, v = random_qkv(1, 2, 5, 4, dtype=torch.float32)
    seen = [module.projection.clone()]
    module.train()
    for call in range(1, 11):
        module(q, k, v)
        assert module.redraws == (call - 1) // 3
        seen.append(module.projection.clone())
    changed = [not torch.equal(before, after) for before, after in zip(seen, seen[1:], strict=False)]
    # Calls 4, 7 and 10 start with a fresh W.
    assert changed == [call in (4, 7, 10) for call in range(1, 11)]
    assert module.log_values()["redraws"] == 3

    module.eval()
    frozen = module.projection.clone()
    outputs = [module(q, k, v) for _ in range(5)]
    assert module.redraws == 3 and torch.equal(module.projection, frozen)
    assert all(torch.equal(outputs[0], out) for out in outputs)


def test_never_redraws_with_interval_zero():
    module = PerformerAttention(2, 4, 16, redraw_interval=0, seed=1).train()
    before = module.projection.clone()
    q, k, v = random_qkv(1, 2, 5, 4, dtype=torch.float32)
    for _ in range(5):
        module(q, k, v)
    assert module.redraws == 0 and torch.equal(module.projection, before)


def test_redraw_keeps_earlier_graph_valid():
    """Two forwards (e.g. retrieval's two documents) then one backward, with a redraw in between."""
    module = PerformerAttention(2, 4, 16, redraw_interval=1, seed=3).train()
    q, k, v = (t.float().requires_grad_() for t in random_qkv(1, 2, 5, 4))
    loss = module(q, k, v).sum() + module(q, k, v).sum()
    assert module.redraws == 1
    loss.backward()
    assert torch.isfinite(q.grad).all()


def test_checkpoint_restores_features_and_redraw_state():
    module = PerformerAttention(2, 4, 16, redraw_interval=2, seed=5).train()
    q, k, v = random_qkv(1, 2, 5, 4, dtype=torch.float32)
    for _ in range(5):
        module(q, k, v)
    restored = PerformerAttention(2, 4, 16, redraw_interval=2, seed=99)
    restored.load_state_dict(module.state_dict())
    assert torch.equal(restored.projection, module.projection)
    assert (restored.seed, restored.redraws, restored.calls_since_redraw) == (5, 2, 1)
    restored.train()
    for _ in range(2):
        module(q, k, v)
        restored(q, k, v)
    assert restored.redraws == module.redraws == 3
    assert torch.equal(restored.projection, module.projection)


def test_seeding_is_reproducible_and_independent_per_layer():
    torch.manual_seed(0)
    first, second = PerformerAttention(2, 8, 16), PerformerAttention(2, 8, 16)
    torch.manual_seed(0)
    again = PerformerAttention(2, 8, 16)
    assert torch.equal(first.projection, again.projection)
    assert not torch.equal(first.projection, second.projection)
    assert torch.equal(
        PerformerAttention(2, 8, 16, seed=4).projection, PerformerAttention(2, 8, 16, seed=4).projection
    )


def test_module_dtype_and_flops():
    module = PerformerAttention(2, 8, 16, num_features=32).eval()
    q, k, v = random_qkv(1, 2, 7, 8, dtype=torch.bfloat16)
    assert module(q, k, v).dtype == torch.bfloat16
    assert module.flops(3, 2, 100, 8) == 8 * 3 * 2 * 100 * 32 * 8
    assert math.isclose(module.log_values()["num_features"], 32)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_features": 0}, {"redraw_interval": -1}, {"eps": 0.0}],
    ids=["features", "interval", "eps"],
)
def test_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="performer"):
        PerformerAttention(2, 4, 16, **kwargs)
