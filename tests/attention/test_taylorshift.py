"""TaylorShift (arXiv 2403.02920): direct, efficient and auto modes against the N×N definition, and the
properties every attention keeps (padding, batch and head independence, causality, invariances)."""

import json
import math

import pytest
import torch
from torch.autograd import gradcheck

from models.attention import crossover as crossovers
from models.attention import taylorshift as ts
from models.attention.crossover import crossover_n0, crossover_n1
from models.attention.polynomial import poly_kernel_attention
from models.attention.taylorshift import (
    TaylorShiftAttention,
    TaylorShiftOptions,
    taylorshift_attention,
    taylorshift_attention_ref,
)
from tests.attention.helpers import F64, D, padded_with_garbage, random_qkv, real_rows, zero_pads

N0 = crossover_n0(D)  # 21


def _tau(heads, seed=0):
    return (0.5 + 1.5 * torch.rand(heads, generator=torch.Generator().manual_seed(seed))).to(F64)


def _pad_mask(batch, seq_len):
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[0, seq_len - seq_len // 3 :] = False
    if batch > 1:
        mask[1, 2:5] = False
    return mask


def _module(heads=2, dim=D, **kwargs):
    kwargs.setdefault("impl", "torch")
    return TaylorShiftAttention(num_heads=heads, head_dim=dim, max_len=1 << 20, **kwargs).to(F64)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("output_norm", [True, False], ids=["onorm", "raw"])
@pytest.mark.parametrize("seq_len", [13, N0, N0 + 1, 45])
@pytest.mark.parametrize("mode", ["direct", "efficient", "auto"])
def test_matches_ref(mode, seq_len, output_norm, masked, causal):
    mask = _pad_mask(2, seq_len) if masked else None
    q, k, v = random_qkv(2, 3, seq_len)
    if masked:
        q, k, v = zero_pads((q, k, v), mask)
    tau = _tau(3)
    out = taylorshift_attention(q, k, v, tau, mask, mode=mode, output_norm=output_norm, causal=causal)
    ref = taylorshift_attention_ref(q, k, v, tau, mask, output_norm=output_norm, causal=causal)
    torch.testing.assert_close(real_rows(out, mask), real_rows(ref, mask), rtol=0, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("output_norm", [True, False], ids=["onorm", "raw"])
def test_efficient_equals_direct_with_gradients(output_norm, causal):
    mask = _pad_mask(2, 29)
    grads = {}
    for mode in ("direct", "efficient"):
        module = _module(heads=3, mode=mode, output_norm=output_norm, causal=causal)
        with torch.no_grad():
            module.tau.copy_(_tau(3))
        q, k, v = [t.requires_grad_() for t in random_qkv(2, 3, 29)]
        out = module(q, k, v, mask)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
        grads[mode] = [out, *torch.autograd.grad((out * weight).sum(), (q, k, v, module.tau))]
    for direct, efficient in zip(grads["direct"], grads["efficient"], strict=True):
        torch.testing.assert_close(efficient, direct, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["direct", "efficient"])
def test_gradcheck(mode):
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    inputs = [t.requires_grad_() for t in (*random_qkv(2, 2, 7, dim=3), _tau(2))]

    def attention(q, k, v, tau):
        # Pads are zeroed by a select, as the base class does; a zero vector is a kink of the L2 norm.
        q, k, v = zero_pads((q, k, v), mask)
        return taylorshift_attention(q, k, v, tau, mask, mode=mode)

    assert gradcheck(attention, inputs, fast_mode=True)


@pytest.mark.parametrize("mode", ["direct", "efficient"])
def test_padding_invariance(mode):
    module = _module(mode=mode)
    with torch.no_grad():
        module.tau.copy_(_tau(2))
    q, k, v = random_qkv(2, 2, 11)
    padded, mask = padded_with_garbage(q, k, v)
    out = module(*padded, mask)
    torch.testing.assert_close(out[:, :, :11], module(q, k, v), rtol=0, atol=1e-12)
    assert (out[:, :, 11:] == 0).all()

    official = _module(mode=mode, mask_padding=False)
    official_out = official(*padded, mask)
    assert (official_out[:, :, :11] - out[:, :, :11]).abs().max() > 1e-3
    assert (official_out[:, :, 11:] == 0).all()
    # The official code has no mask: pads are ordinary tokens and N is the padded length.
    unmasked = official(*padded)
    torch.testing.assert_close(official_out[:, :, :11], unmasked[:, :, :11], rtol=0, atol=1e-12)


@pytest.mark.parametrize("output_norm", [True, False], ids=["onorm", "raw"])
@pytest.mark.parametrize("mode", ["direct", "efficient"])
def test_constant_values_give_constant_output(mode, output_norm):
    mask = _pad_mask(2, 25)
    q, k, _ = random_qkv(2, 2, 25)
    v = torch.full_like(q, 2.5)
    out = _module(mode=mode, output_norm=output_norm)(q, k, v, mask)
    n_real = mask.sum(dim=1).to(F64)[:, None, None, None]
    expected = 2.5 * (torch.sqrt(n_real / D) if output_norm else torch.ones_like(n_real))
    expected = torch.where(mask[:, None, :, None], expected.expand_as(out), torch.zeros_like(out))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["direct", "efficient"])
def test_batch_and_head_independence(mode):
    module = _module(heads=3, mode=mode)
    q, k, v = random_qkv(2, 3, 23)
    out = module(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[1, 2] = 100 * torch.randn_like(t[1, 2])
    changed = module(q2, k2, v2)
    untouched = torch.ones(2, 3, dtype=torch.bool)
    untouched[1, 2] = False
    torch.testing.assert_close(changed[untouched], out[untouched], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["direct", "efficient"])
def test_causal_has_no_future_leakage(mode):
    module = _module(mode=mode, causal=True)
    q, k, v = random_qkv(1, 2, 40)
    out = module(q, k, v)
    for t in (q, k, v):
        t[:, :, 25:] = 50 * torch.randn_like(t[:, :, 25:])
    torch.testing.assert_close(module(q, k, v)[:, :, :25], out[:, :, :25], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["direct", "efficient"])
def test_invariances(mode):
    module = _module(mode=mode)
    q, k, v = random_qkv(2, 2, 27)
    out = module(q, k, v)
    scale = torch.rand(2, 2, 27, 1, dtype=F64) * 10 + 0.1
    torch.testing.assert_close(module(q * scale, k, v), out, rtol=0, atol=1e-12)
    torch.testing.assert_close(module(q, k * scale, v), out, rtol=0, atol=1e-12)
    perm = torch.randperm(27, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        module(q[:, :, perm], k[:, :, perm], v[:, :, perm]), out[:, :, perm], rtol=0, atol=1e-12
    )


def test_scale_bookkeeping():
    """Dropping d^(1/4), 1/N_v and α changes the efficient output only by the explicit √(N_v/d)."""
    mask = _pad_mask(2, 31)
    q, k, v = zero_pads(random_qkv(2, 3, 31), mask)
    tau = _tau(3)
    out = taylorshift_attention(q, k, v, tau, mask, mode="efficient")
    q_hat = torch.nn.functional.normalize(q, dim=-1) * tau.view(1, -1, 1, 1)
    k_hat = torch.nn.functional.normalize(k, dim=-1)
    ones = mask[:, None, :, None].to(F64).expand(2, 3, 31, 1)
    plain = poly_kernel_attention(q_hat, k_hat, torch.cat([ones, v], dim=-1), 0.5, 1.0, 1.0)
    plain = plain[..., 1:] / plain[..., :1]
    n_real = mask.sum(dim=1).to(F64)[:, None, None, None]
    torch.testing.assert_close(
        real_rows(out, mask), real_rows(plain * torch.sqrt(n_real / D), mask), rtol=0, atol=1e-12
    )
    raw = taylorshift_attention(q, k, v, tau, mask, mode="efficient", output_norm=False)
    torch.testing.assert_close(real_rows(raw, mask), real_rows(plain, mask), rtol=0, atol=1e-12)


def test_non_monotone_branch():
    """With τ > 1 logits reach x < -1 where f decreases; b < 0 makes f(-r) the row maximum."""
    q, k, v = random_qkv(1, 2, 19)
    tau = torch.tensor([3.0, 2.0], dtype=F64)
    for coefficients in ({}, {"a": 0.5, "b": -1.0, "c": 1.0}):
        ref = taylorshift_attention_ref(q, k, v, tau, **coefficients)
        for mode in ("direct", "efficient"):
            out = taylorshift_attention(q, k, v, tau, mode=mode, **coefficients)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_crossovers_and_auto_switch():
    table = {16: (273, 158), 32: (1057, 574), 64: (4161, 2174), 128: (16513, 8446)}
    for dim, (n0, n1) in table.items():
        assert (crossover_n0(dim), crossover_n1(dim)) == (n0, n1)
    theory, measured = TaylorShiftOptions(), TaylorShiftOptions(n0=100)
    assert theory.mode_at(N0, D) == "direct" and theory.mode_at(N0 + 1, D) == "efficient"
    assert measured.mode_at(100, D) == "direct" and measured.mode_at(101, D) == "efficient"
    module = _module()
    for seq_len, expected in ((N0, "direct"), (N0 + 1, "efficient")):
        module(*random_qkv(1, 2, seq_len))
        assert module.log_values()["mode_used"] == expected


def test_flops_follow_the_mode():
    module = _module()
    assert module.flops(2, 2, N0, D) == 2 * 2 * 4 * N0**2 * D
    assert module.flops(2, 2, N0 + 1, D) == 2 * 2 * 4 * (N0 + 1) * D * (D + 1) ** 2


def test_log_values():
    module = _module(heads=3, tau_init=1.5)
    module(*random_qkv(1, 3, 9))
    values = module.log_values()
    assert values["impl_used"] == "torch" and values["mode_used"] == "direct"
    assert [values[f"tau_{h}"] for h in range(3)] == [1.5, 1.5, 1.5]


@pytest.mark.parametrize("mode", ["direct", "efficient", "auto"])
def test_dropout_only_in_training(mode):
    module = _module(mode=mode, dropout=0.3)
    reference = _module(mode=mode)
    q, k, v = random_qkv(1, 2, 30)
    module.eval()
    torch.testing.assert_close(module(q, k, v), module(q, k, v), rtol=0, atol=0)
    torch.testing.assert_close(module(q, k, v), reference(q, k, v), rtol=0, atol=0)
    module.train()
    torch.manual_seed(0)
    first = module(q, k, v)
    assert (first - module(q, k, v)).abs().max() > 1e-6
    if mode == "auto":
        assert module.log_values()["mode_pinned"] == "efficient"
        # A shorter batch would switch modes; the pinned one keeps running in training.
        module(*random_qkv(1, 2, 10))
        assert module.log_values()["mode_used"] == "efficient"


def test_bf16_efficient_matches_fp32():
    q, k, v = random_qkv(1, 2, 4096, dim=8, dtype=torch.float32)
    tau = torch.ones(2)
    ref = taylorshift_attention(q, k, v, tau, mode="efficient")
    low = taylorshift_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), tau, mode="efficient")
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_fp16_needs_the_value_normalisation():
    """At N = 100k a V' sum in fp16 overflows without 1/N_v; the module's efficient mode stays finite."""
    seq_len, dim = 100_000, 8
    q, k, v = random_qkv(1, 1, seq_len, dim=dim, dtype=torch.float32)
    tau = torch.ones(1)
    ref = taylorshift_attention(q, k, v, tau, mode="efficient")
    half = taylorshift_attention(q.half(), k.half(), v.half(), tau, mode="efficient")
    assert torch.isfinite(half).all()
    assert (half.float() - ref).abs().max() <= 1e-2 * ref.abs().max()

    scale = dim**0.25
    q_scaled = (torch.nn.functional.normalize(q, dim=-1) * scale).half()
    k_scaled = (torch.nn.functional.normalize(k, dim=-1) * scale).half()
    naive_v = torch.cat([torch.ones_like(v[..., :1]), v], dim=-1).half()
    naive = poly_kernel_attention(q_scaled, k_scaled, naive_v, 0.5, math.sqrt(dim), dim)
    assert torch.isinf(naive[..., 0]).float().mean() > 0.5
    assert ((naive[..., 1:] / naive[..., :1]) == 0).float().mean() > 0.5


def test_low_precision_dtypes_follow_input():
    q, k, v = random_qkv(1, 2, 40)
    tau = torch.ones(2)
    ref = taylorshift_attention(q, k, v, tau, mode="efficient")
    for dtype, tolerance in ((torch.float32, 5e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)):
        for mode in ("direct", "efficient"):
            out = taylorshift_attention(q.to(dtype), k.to(dtype), v.to(dtype), tau, mode=mode)
            assert out.dtype == dtype
            assert (out.double() - ref).abs().max() <= tolerance * ref.abs().max()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "fast"}, "unknown mode"),
        ({"impl": "cuda"}, "unknown impl"),
        ({"impl": "triton", "mode": "direct"}, "mode='direct'"),
        ({"a": 0.0}, "a > 0"),
        ({"a": 0.5, "b": 2.0, "c": 1.0}, "c >= b"),
        ({"n0": "measured"}, "n0"),
        ({"dropout": 1.0}, "dropout"),
        ({"causal": True, "dropout": 0.1, "mode": "efficient"}, "causal dropout"),
    ],
)
def test_rejects_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _module(**kwargs)


def test_impl_auto_and_triton_on_cpu(monkeypatch):
    module = _module(impl="auto", mode="efficient")
    module(*random_qkv(1, 2, 9))
    assert module.log_values()["impl_used"] == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton'"):
        _module(impl="triton", mode="efficient")(*random_qkv(1, 2, 9))


def test_efficient_dropout_acts_on_the_state():
    """Training dropout in the efficient mode drops S2 entries, denominator column included."""
    q, k, v = random_qkv(1, 1, 30)
    tau = torch.ones(1, dtype=F64)
    torch.manual_seed(5)
    dropped = taylorshift_attention(q, k, v, tau, mode="efficient", dropout=0.5)
    torch.manual_seed(5)
    expected_s2_mask = torch.nn.functional.dropout(torch.ones(1, 1, D * D, D + 1, dtype=F64), p=0.5)
    torch.manual_seed(5)
    states = []
    original = ts.poly_readout

    def spy(query, state, *args, **kwargs):
        states.append(state[2])
        return original(query, state, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ts, "poly_readout", spy)
        again = taylorshift_attention(q, k, v, tau, mode="efficient", dropout=0.5)
    torch.testing.assert_close(again, dropped, rtol=0, atol=0)
    assert ((states[0] == 0) == (expected_s2_mask == 0)).all()


def test_autocast_keeps_fp32_states():
    """bf16 autocast must not push the efficient-mode state matmuls down to bf16."""
    q, k, v = random_qkv(1, 2, 300, dim=8, dtype=torch.float32)
    tau = torch.ones(2)
    ref = taylorshift_attention(q, k, v, tau, mode="efficient", causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = taylorshift_attention(q, k, v, tau, mode="efficient", causal=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_auto_uses_the_measured_crossover_table(monkeypatch):
    """n0='table' (the default) switches at the table's N0 for the device kind, dtype and d, else theory."""
    monkeypatch.setattr(crossovers, "_crossover_table", {"cpu": {"float32": {"4": 7}}})
    options = TaylorShiftOptions()
    assert options.n0 == "table"
    assert options.mode_at(7, D, device_kind="cpu", dtype=torch.float32) == "direct"
    assert options.mode_at(8, D, device_kind="cpu", dtype=torch.float32) == "efficient"
    # No entry for this dtype, device kind or head dim: the FLOP theory d² + d + 1.
    for kind, dtype, dim in (("cpu", F64, D), ("cuda", torch.float32, D), ("cpu", torch.float32, 8)):
        theory = crossover_n0(dim)
        assert options.mode_at(theory, dim, device_kind=kind, dtype=dtype) == "direct"
        assert options.mode_at(theory + 1, dim, device_kind=kind, dtype=dtype) == "efficient"
    # An explicit n0 or 'theory' ignores the table.
    assert TaylorShiftOptions(n0="theory").mode_at(8, D, device_kind="cpu", dtype=torch.float32) == "direct"
    assert TaylorShiftOptions(n0=3).mode_at(4, D, device_kind="cpu", dtype=torch.float32) == "efficient"
    # The module asks with its inputs' device and dtype.
    module = _module()
    module(*random_qkv(1, 2, 8, dtype=torch.float32))
    assert module.log_values()["mode_used"] == "efficient"
    module(*random_qkv(1, 2, 8))
    assert module.log_values()["mode_used"] == "direct"


def test_committed_crossover_table_is_well_formed():
    table = json.loads(crossovers.CROSSOVER_TABLE.read_text())
    assert table, "models/attention/crossover.json holds no measurement"
    for kind, by_dtype in table.items():
        assert kind in ("cpu", "cuda")
        for dtype_name, by_dim in by_dtype.items():
            assert isinstance(getattr(torch, dtype_name), torch.dtype)
            for dim, n0 in by_dim.items():
                assert int(dim) >= 1 and type(n0) is int and n0 >= 0
                assert crossovers.measured_n0(kind, getattr(torch, dtype_name), int(dim)) == n0


def test_crossover_script_measures_and_merges(tmp_path):
    from lra import crossover

    n0 = crossover.measure_n0(2, torch.device("cpu"), torch.float32, batch=1, heads=1, repeats=1, max_len=32)
    assert n0 is None or 1 <= n0 <= 32
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"cpu": {"float32": {"16": 100, "32": 300}}}))
    merged = crossover.merge_table(str(path), "cpu", "float32", {32: 250, 64: 900})
    assert merged == {"cpu": {"float32": {"16": 100, "32": 250, "64": 900}}}
    assert crossover.merge_table(str(tmp_path / "missing.json"), "cuda", "bfloat16", {64: 5000}) == {
        "cuda": {"bfloat16": {"64": 5000}}
    }
