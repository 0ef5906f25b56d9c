"""The attention contract, checked for every registered attention (every YAML in conf/attention/).

Only the shared interface is used: the YAML, the factory it instantiates, ``forward(q, k, v, mask)`` and
the class attributes of models/attention/base.py. A new YAML is covered without touching this file.
"""

import functools
import math
from numbers import Number

import pytest
import torch

from lra.registry import attention_factory, registered_attentions
from models.attention.base import Attention, zero_pads
from models.attention.maps import attention_weights, weights_output

NUM_HEADS, HEAD_DIM = 2, 4
# At least every default projection length (Linformer's proj_len), so that every YAML builds unchanged.
MAX_LEN = 256
F64 = torch.float64

# ``config`` is the registry name: conf/attention/<config>.yaml.
pytestmark = pytest.mark.parametrize("config", registered_attentions())


def build(config: str, attn_dropout: float = 0.0, dtype: torch.dtype = F64, **overrides) -> Attention:
    """The module train.py would build from the YAML, ``${attn_dropout}`` set to ``attn_dropout``."""
    module = attention_factory(config, attn_dropout=attn_dropout)(
        num_heads=NUM_HEADS, head_dim=HEAD_DIM, max_len=MAX_LEN, **overrides
    )
    return module.to(dtype).eval()


def random_qkv(batch, seq_len, dtype=F64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, NUM_HEADS, seq_len, HEAD_DIM, generator=generator, dtype=dtype) for _ in "qkv"]


def lengths_mask(lengths, seq_len):
    return torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]


def test_instantiates(config):
    partial = attention_factory(config)
    assert isinstance(partial, functools.partial)
    module = build(config)
    assert isinstance(module, Attention)
    # The registry's names match everywhere: conf/attention/<name>.yaml ↔ Attention.name ↔ W&B tag.
    assert module.name == config


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_shape_and_dtype(config, dtype):
    module = build(config, dtype=dtype)
    q, k, v = random_qkv(2, 7, dtype)
    for mask in (None, lengths_mask([7, 4], 7)):
        out = module(q, k, v, mask)
        assert out.shape == q.shape and out.dtype == dtype
        assert torch.isfinite(out).all()


def test_padding_invariance(config):
    """Pads hold huge garbage (and a NaN, an inf); real outputs equal the unpadded run, pad rows are 0."""
    module = build(config)
    lengths, seq_len = [7, 4], 10
    q, k, v = random_qkv(2, seq_len)
    generator = torch.Generator().manual_seed(1)
    mask = lengths_mask(lengths, seq_len)
    pads = ~mask[:, None, :, None].expand_as(q)
    garbage = [1e4 * torch.randn(q.shape, generator=generator, dtype=F64) for _ in "qkv"]
    garbage[1][0, 0, -1, 0], garbage[2][1, 1, -1, -1] = float("nan"), float("inf")
    padded = [torch.where(pads, noise, t) for t, noise in zip((q, k, v), garbage, strict=True)]

    out = module(*padded, mask)
    assert not out.isnan().any()
    assert torch.equal(out.masked_select(pads), torch.zeros(int(pads.sum()), dtype=F64))
    for b, length in enumerate(lengths):
        alone = module(*(t[b : b + 1, :, :length] for t in (q, k, v)))
        torch.testing.assert_close(out[b : b + 1, :, :length], alone, atol=1e-12, rtol=0)


def test_batch_and_head_independence(config):
    module = build(config)
    q, k, v = random_qkv(2, 7)
    mask = lengths_mask([7, 5], 7)
    before = module(q, k, v, mask)
    generator = torch.Generator().manual_seed(2)
    perturbed = [t.clone() for t in (q, k, v)]
    for t in perturbed:
        t[1, 0] += 3 * torch.randn(t[1, 0].shape, generator=generator, dtype=F64)
    after = module(*perturbed, mask)
    others = torch.ones(2, NUM_HEADS, dtype=torch.bool)
    others[1, 0] = False
    torch.testing.assert_close(after[others], before[others], atol=1e-12, rtol=0)
    assert not torch.allclose(after[1, 0], before[1, 0])


def test_deterministic_in_eval(config):
    """With dropout on, eval() is deterministic and computes the dropout-free function (spec 6.13)."""
    torch.manual_seed(3)
    with_dropout = build(config, attn_dropout=0.3)
    without = build(config, attn_dropout=0.0)
    without.load_state_dict(with_dropout.state_dict())
    q, k, v = random_qkv(2, 7)
    mask = lengths_mask([7, 5], 7)
    first = with_dropout(q, k, v, mask)
    assert torch.equal(first, with_dropout(q, k, v, mask))
    torch.testing.assert_close(first, without(q, k, v, mask), atol=1e-12, rtol=0)


def test_permutation_equivariance(config):
    module = build(config)
    if module.needs_seq_len:
        pytest.skip("parameters depend on absolute positions")
    q, k, v = random_qkv(2, 7)
    mask = lengths_mask([7, 5], 7)
    order = torch.randperm(7, generator=torch.Generator().manual_seed(4))
    out = module(q, k, v, mask)
    shuffled = module(*(t[:, :, order] for t in (q, k, v)), mask[:, order])
    torch.testing.assert_close(shuffled, out[:, :, order], atol=1e-12, rtol=0)


def test_constant_values_give_the_constant(config):
    module = build(config)
    if not module.is_convex:
        pytest.skip("the output is not a convex combination of the values (is_convex is False)")
    q, k, _ = random_qkv(2, 7)
    v = torch.full_like(q, 2.5)
    mask = lengths_mask([7, 5], 7)
    out = module(q, k, v, mask)
    expected = torch.where(mask[:, None, :, None], 2.5, 0.0).to(F64).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_gradcheck(config):
    module = build(config)
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 6))
    mask = lengths_mask([6, 4], 6)
    # Fast mode (random projections of the Jacobian) keeps this cheap; each method's own test file runs
    # the full check on its functions.
    assert torch.autograd.gradcheck(lambda q, k, v: module(q, k, v, mask), (q, k, v), fast_mode=True)


def test_flops_and_log_values(config):
    module = build(config)
    flops = module.flops(2, NUM_HEADS, 16, HEAD_DIM)
    assert isinstance(flops, Number) and math.isfinite(flops) and flops > 0
    values = module.log_values()
    assert isinstance(values, dict)
    for key, value in values.items():
        assert isinstance(key, str)
        scalar_tensor = isinstance(value, torch.Tensor) and value.numel() == 1
        assert isinstance(value, Number | str) or scalar_tensor, f"{key}={value!r} is not a scalar or string"


def test_matches_its_reference_and_its_weights(config):
    """The forward equals the module's explicit N×N reference, and its explicit weights (the attention maps)
    rebuild the same output, so ``callbacks=attention_maps`` works for every registered attention."""
    module = build(config)
    q, k, v = random_qkv(2, 7)
    mask = lengths_mask([7, 5], 7)
    out = module(q, k, v, mask)
    (reference,) = zero_pads((module.reference(*zero_pads((q, k, v), mask), mask),), mask)
    torch.testing.assert_close(out, reference, atol=1e-10, rtol=0)
    weights = attention_weights(module, q, k, mask)
    torch.testing.assert_close(weights_output(module, weights, v, mask), out, atol=1e-10, rtol=0)


def test_causal_sees_no_future(config):
    if not build(config).supports_causal:
        with pytest.raises(ValueError, match="causal"):
            build(config, causal=True)
        return
    try:
        module = build(config, causal=True)
    except ValueError as error:
        pytest.skip(f"the default config rejects causal=true: {error}")
    q, k, v = random_qkv(2, 7)
    mask = lengths_mask([7, 6], 7)
    out = module(q, k, v, mask)
    generator = torch.Generator().manual_seed(5)
    for position in (0, 3):
        future = [t.clone() for t in (q, k, v)]
        for t in future:
            t[:, :, position + 1 :] += torch.randn(
                t[:, :, position + 1 :].shape, generator=generator, dtype=F64
            )
        changed = module(*future, mask)
        torch.testing.assert_close(
            changed[:, :, : position + 1], out[:, :, : position + 1], atol=1e-12, rtol=0
        )


def test_compile_traces_like_eager(config):
    """Dynamo tracing without code generation (cheap): catches graph-time failures in every attention."""
    module = build(config)
    q, k, v = random_qkv(2, 7)
    mask = lengths_mask([7, 5], 7)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, mask), module(q, k, v, mask), atol=1e-12, rtol=0)


@pytest.mark.slow
def test_compile_matches_eager(config):
    """Full torch.compile (Inductor codegen, tens of seconds on CPU), fp32 tolerance."""
    module = build(config, dtype=torch.float32)
    q, k, v = random_qkv(2, 7, torch.float32)
    mask = lengths_mask([7, 5], 7)
    torch._dynamo.reset()
    compiled = torch.compile(module)
    torch.testing.assert_close(compiled(q, k, v, mask), module(q, k, v, mask), atol=1e-5, rtol=1e-5)
