import math

import pytest
import torch

from models.attention.linformer import LinformerAttention, linformer_attention, linformer_attention_ref
from models.attention.softmax import softmax_attention_ref

F64 = torch.float64


def random_qkv(batch, heads, seq_len, head_dim, dtype=F64, seed=42):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq_len, head_dim, generator=generator, dtype=dtype) for _ in "qkv"]


def projections(proj_len, max_len, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(proj_len, max_len, generator=generator, dtype=F64) - 0.5 for _ in "ef"]


def right_padded_mask(batch, seq_len):
    lengths = torch.tensor([max(1, seq_len - 3 * b) for b in range(batch)])
    return torch.arange(seq_len)[None, :] < lengths[:, None]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize(
    "batch, heads, seq_len, head_dim, proj_len, max_len",
    [(2, 3, 13, 8, 5, 20), (1, 2, 63, 16, 16, 63), (2, 1, 1, 4, 3, 7)],
    ids=lambda x: str(x),
)
def test_matches_ref(batch, heads, seq_len, head_dim, proj_len, max_len, masked):
    q, k, v = (t.requires_grad_() for t in random_qkv(batch, heads, seq_len, head_dim))
    e_proj, f_proj = (t.requires_grad_() for t in projections(proj_len, max_len))
    mask = right_padded_mask(batch, seq_len) if masked else None
    upstream = torch.randn(batch, heads, seq_len, head_dim, dtype=F64)
    results = []
    for attention in (linformer_attention, linformer_attention_ref):
        out = attention(q, k, v, e_proj, f_proj, mask)
        results.append((out, *torch.autograd.grad(out, (q, k, v, e_proj, f_proj), upstream)))
    for fast, ref in zip(*results, strict=True):
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)


def test_gradcheck():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 1, 5, 3))
    e_proj, f_proj = (t.requires_grad_() for t in projections(2, 6))
    mask = torch.tensor([[True, True, True, True, False]])

    def attend(q, k, v, e_proj, f_proj):
        return linformer_attention(q, k, v, e_proj, f_proj, mask)

    assert torch.autograd.gradcheck(attend, (q, k, v, e_proj, f_proj))


def test_identity_projection_equals_softmax():
    """k = N and E = F = I: the projection is a no-op and Linformer is exact softmax."""
    seq_len = 11
    module = LinformerAttention(2, 8, seq_len, proj_len=seq_len, share="kv").double().eval()
    with torch.no_grad():
        module.e_proj.copy_(torch.eye(seq_len))
    q, k, v = random_qkv(2, 2, seq_len, 8)
    torch.testing.assert_close(module(q, k, v), softmax_attention_ref(q, k, v), atol=1e-12, rtol=0)


def test_padding_invariance_within_max_len():
    """Real outputs depend neither on pad content nor on the number of pads, up to N_max."""
    module = LinformerAttention(2, 4, 16, proj_len=6).double().eval()
    q, k, v = random_qkv(1, 2, 5, 4)
    reference = module(q, k, v)
    for pads in (1, 4, 11):
        garbage = [1e3 * torch.randn(1, 2, pads, 4, dtype=F64) for _ in range(3)]
        padded = [torch.cat([t, g], dim=2) for t, g in zip((q, k, v), garbage, strict=True)]
        mask = torch.arange(5 + pads)[None, :] < 5
        out = module(*padded, mask)
        torch.testing.assert_close(out[:, :, :5], reference, atol=1e-12, rtol=0)
        assert torch.equal(out[:, :, 5:], torch.zeros_like(out[:, :, 5:]))


def test_raises_for_causal():
    with pytest.raises(ValueError, match="causal"):
        LinformerAttention(2, 4, 16, proj_len=4, causal=True)


def test_raises_beyond_max_len():
    module = LinformerAttention(2, 4, 8, proj_len=4)
    q, k, v = random_qkv(1, 2, 9, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="max_len"):
        module(q, k, v)
    with pytest.raises(ValueError, match="max_len"):
        linformer_attention(q, k, v, module.e_proj, module.f_proj)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"proj_len": 17}, "proj_len"),
        ({"proj_len": 0}, "proj_len"),
        ({"share": "layerwise"}, "layerwise"),
        ({"share": "rows"}, "headwise"),
        ({"dropout": 1.0}, "dropout"),
    ],
    ids=["proj_len-long", "proj_len-zero", "layerwise", "unknown-share", "dropout"],
)
def test_rejects_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinformerAttention(2, 4, 16, **{"proj_len": 4, **kwargs})


def test_sharing_and_init():
    headwise = LinformerAttention(2, 4, 32, proj_len=16)
    kv = LinformerAttention(2, 4, 32, proj_len=16, share="kv")
    assert sum(p.numel() for p in headwise.parameters()) == 2 * 16 * 32
    assert sum(p.numel() for p in kv.parameters()) == 16 * 32 and kv.f_proj is None
    bound = 1 / math.sqrt(16)
    assert headwise.e_proj.abs().max() <= bound and headwise.f_proj.abs().max() <= bound
    assert headwise.e_proj.abs().max() > 0.8 * bound
    assert kv.log_values() == {"proj_len": 16, "share": "kv"}
    assert headwise.flops(2, 3, 100, 4) == 8 * 2 * 3 * 100 * 16 * 4


def test_dropout_only_in_training():
    torch.manual_seed(0)
    with_dropout = LinformerAttention(2, 4, 16, proj_len=8, dropout=0.5).double()
    without = LinformerAttention(2, 4, 16, proj_len=8, dropout=0.0).double()
    without.load_state_dict(with_dropout.state_dict())
    q, k, v = random_qkv(2, 2, 12, 4)
    with_dropout.eval()
    without.eval()
    assert torch.equal(with_dropout(q, k, v), without(q, k, v))
    with_dropout.train()
    assert not torch.allclose(with_dropout(q, k, v), without(q, k, v))
