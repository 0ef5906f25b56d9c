"""Fastmax (arXiv 2402.07901): the factorised form against the N×N definition, and the properties every
attention keeps (padding, batch and head independence, causality, invariances)."""

import pytest
import torch
from torch.autograd import gradcheck

from models.attention import fastmax as fm
from models.attention.fastmax import (
    FastmaxAttention,
    FastmaxOptions,
    fastmax_attention,
    fastmax_attention_ref,
)
from models.attention.polynomial import poly_kernel_attention
from models.attention.taylorshift import taylorshift_attention
from tests.attention.helpers import F64, D, padded_with_garbage, random_qkv, real_rows, zero_pads


def _pad_mask(batch, seq_len):
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[0, seq_len - seq_len // 3 :] = False
    if batch > 1:
        mask[1, :3] = False
    return mask


def _module(heads=2, dim=D, **kwargs):
    kwargs.setdefault("impl", "torch")
    return FastmaxAttention(num_heads=heads, head_dim=dim, max_len=1 << 20, **kwargs)


VARIANTS = [
    {"order": 2},
    {"order": 2, "center": True, "temperature": 1.7, "lim": 1.3},
    {"order": 2, "normalize": "scaled"},
    {"order": 2, "normalize": "none", "a0": 2.0, "a1": 0.5, "a2": 0.25},
    {"order": 1},
    {"order": 1, "center": True, "lim": 0.8},
    {"order": 2, "normalize": "running_maxnorm"},
    {"order": 1, "normalize": "running_maxnorm"},
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("seq_len", [1, 17, 45])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items()))
def test_matches_ref(variant, seq_len, masked, causal):
    mask = _pad_mask(2, seq_len) if masked and seq_len > 3 else None
    q, k, v = random_qkv(2, 3, seq_len)
    if mask is not None:
        q, k, v = zero_pads((q, k, v), mask)
    # The sequence-global maxnorm leaks the future under causal masking (refused by default; see
    # test_global_maxnorm_leaks_the_future), but the fast path must still equal its definition.
    options = {"causal": causal, "allow_global_norm_causal": True, **variant}
    out = fastmax_attention(q, k, v, mask, **options)
    ref = fastmax_attention_ref(q, k, v, mask, **options)
    torch.testing.assert_close(real_rows(out, mask), real_rows(ref, mask), rtol=0, atol=1e-10)


@pytest.mark.parametrize("order", [1, 2])
def test_gradients_match_ref(order):
    mask = _pad_mask(2, 23)
    inputs = [t.requires_grad_() for t in zero_pads(random_qkv(2, 2, 23), mask)]
    weight = torch.randn(2, 2, 23, D, dtype=F64, generator=torch.Generator().manual_seed(1))
    weight = weight * mask[:, None, :, None]
    options = {"order": order, "center": True}
    grads = torch.autograd.grad((fastmax_attention(*inputs, mask, **options) * weight).sum(), inputs)
    refs = torch.autograd.grad((fastmax_attention_ref(*inputs, mask, **options) * weight).sum(), inputs)
    for grad, ref in zip(grads, refs, strict=True):
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("normalize", ["maxnorm", "running_maxnorm"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck(causal, normalize):
    mask = torch.tensor([[True] * 7, [False] + [True] * 6])
    inputs = [t.requires_grad_() for t in random_qkv(2, 2, 7, dim=3)]

    def attention(q, k, v):
        q, k, v = zero_pads((q, k, v), mask)
        options = {"causal": causal, "normalize": normalize, "allow_global_norm_causal": True}
        return fastmax_attention(q, k, v, mask, center=True, **options)

    assert gradcheck(attention, inputs, fast_mode=True)


def test_detach_norm_changes_only_gradients():
    q, k, v = [t.requires_grad_() for t in random_qkv(1, 2, 15)]
    outs = [fastmax_attention(q, k, v, detach_norm=detach) for detach in (False, True)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    grads = [torch.autograd.grad(out.square().sum(), q)[0] for out in outs]
    assert (grads[0] - grads[1]).abs().max() > 1e-6


@pytest.mark.parametrize("order", [1, 2])
def test_padding_invariance(order):
    module = _module(order=order, center=True)
    q, k, v = random_qkv(2, 2, 11)
    padded, mask = padded_with_garbage(q, k, v)
    out = module(*padded, mask)
    torch.testing.assert_close(out[:, :, :11], module(q, k, v), rtol=0, atol=1e-12)
    assert (out[:, :, 11:] == 0).all()


def test_batch_and_head_independence():
    """A tensor-global max norm would couple the slices."""
    module = _module(heads=3)
    q, k, v = random_qkv(2, 3, 23)
    out = module(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[1, 2] = 100 * torch.randn_like(t[1, 2])
    untouched = torch.ones(2, 3, dtype=torch.bool)
    untouched[1, 2] = False
    torch.testing.assert_close(module(q2, k2, v2)[untouched], out[untouched], rtol=0, atol=1e-12)


def _future_leak(module):
    q, k, v = random_qkv(1, 2, 40)
    out = module(q, k, v)
    for t in (q, k, v):
        t[:, :, 25:] = 50 * torch.randn_like(t[:, :, 25:])
    return (module(q, k, v)[:, :, :25] - out[:, :, :25]).abs().max()


@pytest.mark.parametrize(
    ("order", "normalize"), [(1, "running_maxnorm"), (2, "running_maxnorm"), (2, "scaled"), (2, "none")]
)
def test_causal_has_no_future_leakage(order, normalize):
    assert _future_leak(_module(order=order, causal=True, normalize=normalize)) <= 1e-12


def test_global_maxnorm_leaks_the_future():
    """Why maxnorm + causal is refused by default."""
    assert _future_leak(_module(causal=True, allow_global_norm_causal=True)) > 1e-6


def test_equals_taylorshift_on_unit_norm_inputs():
    q, k, v = random_qkv(2, 3, 33)
    tau = torch.ones(3, dtype=F64)
    fastmax = fastmax_attention(q, k, v, order=2, lim=1.0, temperature=1.0)
    taylor = taylorshift_attention(q, k, v, tau, mode="efficient", output_norm=False)
    assert (fastmax - taylor).abs().max() > 1e-2
    q, k = (torch.nn.functional.normalize(t, dim=-1) for t in (q, k))
    fastmax = fastmax_attention(q, k, v, order=2, lim=1.0, temperature=1.0)
    for mode in ("direct", "efficient"):
        taylor = taylorshift_attention(q, k, v, tau, mode=mode, output_norm=False)
        torch.testing.assert_close(fastmax, taylor, rtol=0, atol=1e-12)


def test_invariances():
    module = _module(order=2, center=True)
    q, k, _ = random_qkv(2, 2, 27)
    perm = torch.randperm(27, generator=torch.Generator().manual_seed(3))
    v = torch.randn_like(q)
    out = module(q, k, v)
    torch.testing.assert_close(
        module(q[:, :, perm], k[:, :, perm], v[:, :, perm]), out[:, :, perm], rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        module(q, k, torch.full_like(v, -1.5)), torch.full_like(v, -1.5), rtol=0, atol=1e-12
    )


def test_positivity():
    q, k, _ = random_qkv(2, 2, 31)
    mask = _pad_mask(2, 31)
    for lim in (1.0, 0.7):
        q_norm, k_norm = fm._normalize_qk(q, k, mask, FastmaxOptions(lim=lim, center=True))
        x = q_norm @ k_norm.transpose(-1, -2)
        assert x.abs().max() <= lim * lim + 1e-12
    # Order 2, worst case k = -q at the largest norm: f(-1) = 1/2 keeps every denominator positive.
    for keys in (k, -q):
        q_norm, k_norm = fm._normalize_qk(q, keys, None, FastmaxOptions())
        denominators = poly_kernel_attention(q_norm, k_norm, torch.ones_like(q[..., :1]), 0.5, 1.0, 1.0)
        assert denominators.min() >= 0.5 - 1e-12


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("dropout_mode", ["feature", "output_noise"])
def test_dropout_only_in_training(dropout_mode, order):
    module = _module(order=order, dropout_mode=dropout_mode, dropout=0.3)
    q, k, v = random_qkv(1, 2, 30)
    module.eval()
    torch.testing.assert_close(module(q, k, v), module(q, k, v), rtol=0, atol=0)
    torch.testing.assert_close(module(q, k, v), _module(order=order)(q, k, v), rtol=0, atol=0)
    module.train()
    torch.manual_seed(0)
    assert (module(q, k, v) - module(q, k, v)).abs().max() > 1e-6
    if dropout_mode == "feature":
        # Numerator and denominator share the dropped features, so rows still sum to 1.
        constant = torch.full_like(v, 0.75)
        torch.testing.assert_close(module(q, k, constant), constant, rtol=0, atol=1e-10)


def test_low_precision():
    q, k, v = random_qkv(1, 2, 4096, dim=8, dtype=torch.float32)
    ref = fastmax_attention(q, k, v)
    for dtype in (torch.bfloat16, torch.float16):
        low = fastmax_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        assert low.dtype == dtype and torch.isfinite(low).all()
        assert (low.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_flops_and_log_values():
    assert _module(order=2).flops(2, 3, 100, D) == 2 * 3 * 4 * 100 * D * (D + 1) ** 2
    assert _module(order=1).flops(2, 3, 100, D) == 2 * 3 * 4 * 100 * D * (D + 1)
    module = _module(impl="auto")
    module(*random_qkv(1, 2, 5, dtype=torch.float32))
    assert module.log_values() == {"impl": "auto", "impl_used": "torch"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"order": 1, "lim": 1.5}, "lim <= 1"),
        ({"order": 1, "normalize": "scaled"}, "bounded logits"),
        ({"order": 1, "temperature": 0.5}, "a0 >= "),
        ({"order": 3}, "order must be 1 or 2"),
        ({"a0": 0.1}, "a0 >= a1"),
        ({"normalize": "layer"}, "unknown normalize"),
        ({"dropout_mode": "attention"}, "unknown dropout_mode"),
        ({"dropout": 0.1}, "dropout_mode"),
        ({"causal": True}, "leaks the future"),
        ({"impl": "cuda"}, "unknown impl"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_rejects_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _module(**kwargs)


def test_triton_on_cpu_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton'"):
        _module(impl="triton")(*random_qkv(1, 2, 5, dtype=torch.float32))


def test_autocast_keeps_fp32_states():
    """bf16 autocast must not push the state matmuls down to bf16."""
    q, k, v = random_qkv(1, 2, 300, dim=8, dtype=torch.float32)
    options = {"causal": True, "normalize": "running_maxnorm", "dropout_mode": "feature", "dropout": 0.2}
    torch.manual_seed(0)
    ref = fastmax_attention(q, k, v, **options)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastmax_attention(q, k, v, **options)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
