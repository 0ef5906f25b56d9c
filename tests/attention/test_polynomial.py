"""The polynomial-kernel primitive: factorised forms against the explicit N×N oracle (docs/kernels.md)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from models.attention import kernels, polynomial
from models.attention.kernels import poly_torch
from models.attention.polynomial import poly_kernel_attention, poly_kernel_attention_ref

F64 = torch.float64


def _inputs(batch, heads, seq_len, dim, value_dim, dtype=F64, seed=42, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, seq_len, dim)] * 2 + [(batch, heads, seq_len, value_dim)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("a", [0.5, 0.0], ids=["order2", "order1"])
@pytest.mark.parametrize("seq_len", [1, 7, 37, 101])
def test_matches_ref(seq_len, a, causal):
    q, k, v = _inputs(2, 3, seq_len, 4, 5)
    out = poly_kernel_attention(q, k, v, a, 1.3, 2.0, causal)
    ref = poly_kernel_attention_ref(q, k, v, a, 1.3, 2.0, causal)
    assert out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_explicit_features_match_default(causal):
    q, k, v = _inputs(1, 2, 37, 3, 4)
    features = polynomial.quadratic_features
    explicit = (features(q), features(k))
    out = polynomial.run_poly_kernel("torch", q, k, v, (0.5, 1.0, 1.0), causal, F64, explicit)
    torch.testing.assert_close(
        out, poly_kernel_attention_ref(q, k, v, 0.5, 1.0, 1.0, causal), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradients_match_ref(causal):
    q, k, v = _inputs(2, 2, 41, 3, 4, requires_grad=True)
    grad_out = torch.randn(2, 2, 41, 4, dtype=F64)
    grads = torch.autograd.grad(
        (poly_kernel_attention(q, k, v, 0.5, 1.0, 1.0, causal) * grad_out).sum(), (q, k, v)
    )
    refs = torch.autograd.grad(
        (poly_kernel_attention_ref(q, k, v, 0.5, 1.0, 1.0, causal) * grad_out).sum(), (q, k, v)
    )
    for grad, ref in zip(grads, refs, strict=True):
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("a", [0.5, 0.0], ids=["order2", "order1"])
def test_gradcheck(a, causal):
    # 19 tokens span two causal chunks (the chunk is at least 16).
    q, k, v = _inputs(1, 2, 19, 2, 3, requires_grad=True)
    assert gradcheck(
        lambda q, k, v: poly_kernel_attention(q, k, v, a, 0.7, 1.1, causal), (q, k, v), fast_mode=True
    )


def test_feature_blocks_match_single_block(monkeypatch):
    """Forward and backward over several N blocks (the memory bound of the non-causal path) are exact."""
    monkeypatch.setattr(poly_torch, "FEATURE_BLOCK_ELEMENTS", 2 * 9 * 10)
    monkeypatch.setattr(poly_torch, "MIN_BLOCK_ROWS", 1)
    q, k, v = _inputs(1, 2, 33, 3, 4, requires_grad=True)
    # Feature blocks are 3·4 wide: 15 rows each, three per head.
    assert len(poly_torch.blocking(2, 33, 3 * 4).split(q.reshape(2, 33, 3))) == 6
    out = poly_kernel_attention(q, k, v, 0.5, 1.0, 1.0)
    ref = poly_kernel_attention_ref(q, k, v, 0.5, 1.0, 1.0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda q, k, v: poly_kernel_attention(q, k, v, 0.5, 1.0, 1.0), (q, k, v), fast_mode=True)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_never_builds_n_by_n(causal):
    seq_len = 1024
    q, k, v = _inputs(1, 1, seq_len, 2, 3, dtype=torch.float32, requires_grad=True)
    with _LargestTensor() as recorder:
        poly_kernel_attention(q, k, v, 0.5, 1.0, 1.0, causal).sum().backward()
    assert recorder.largest < seq_len * seq_len // 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    q, k, v = _inputs(1, 2, 65, 4, 5)
    ref = poly_kernel_attention_ref(q, k, v, 0.5, 1.0, 1.0) / 65
    out = poly_kernel_attention(q.to(dtype), k.to(dtype), v.to(dtype) / 65, 0.5, 1.0, 1.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tolerance = 5e-5 if dtype == torch.float32 else 2e-2
    assert (out.double() - ref).abs().max() <= tolerance * ref.abs().max()


def test_rejects_bad_shapes():
    q, k, v = _inputs(1, 1, 5, 2, 3)
    with pytest.raises(ValueError, match="shape"):
        poly_kernel_attention(q, k[:, :, :4], v, 0.5, 1.0, 1.0)


def test_impl_selection(monkeypatch):
    q = torch.zeros(1, 1, 4, 2)
    assert kernels.select_impl("auto", q) == "torch"
    assert kernels.select_impl("torch", q) == "torch"
    with pytest.raises(ValueError, match="unknown impl"):
        kernels.select_impl("cuda", q)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton'"):
        kernels.select_impl("triton", q)


def test_triton_refuses_what_it_cannot_express(monkeypatch):
    module, why = kernels.triton_module()
    if module is None:
        pytest.skip(f"Triton kernel unavailable: {why}")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.zeros(1, 1, 4, 2)
    assert kernels.select_impl("triton", q) == "triton"
    with pytest.raises(ValueError, match="feature dropout"):
        kernels.select_impl("triton", q, torch_only="feature dropout")
    if not getattr(module, "SUPPORTS_CAUSAL", False):
        with pytest.raises(ValueError, match="causal"):
            kernels.select_impl("triton", q, causal=True)


_INTERPRETER_CHECK = """
import torch
from models.attention.fastmax import FastmaxAttention
from models.attention.taylorshift import TaylorShiftAttention

torch.manual_seed(0)
q, k, v = (torch.randn(2, 2, 40, 4) for _ in range(3))
mask = torch.ones(2, 40, dtype=torch.bool)
mask[0, 33:] = False
for cls, options in ((TaylorShiftAttention, {"mode": "efficient"}), (FastmaxAttention, {})):
    results = []
    for impl in ("torch", "triton"):
        module = cls(num_heads=2, head_dim=4, max_len=64, impl=impl, **options)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = module(*leaves, mask)
        out.square().sum().backward()
        assert module.log_values()["impl_used"] == impl
        results.append([out, *(t.grad for t in leaves)])
    for torch_result, triton_result in zip(*results, strict=True):
        assert (torch_result - triton_result).abs().max() <= 1e-4 * torch_result.abs().max()
"""


@pytest.mark.slow
def test_modules_run_the_triton_kernel_under_the_interpreter():
    """impl='triton' reaches the kernel and matches torch (subprocess: TRITON_INTERPRET acts at import)."""
    module, why = kernels.triton_module()
    if module is None:
        pytest.skip(f"Triton kernel unavailable: {why}")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CHECK],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_row_chunks_within_a_head_match_ref(monkeypatch):
    """The non-causal path cut into row chunks inside each head (long sequences) is exact, with gradients."""
    monkeypatch.setattr(poly_torch, "FEATURE_BLOCK_ELEMENTS", 5 * 3 * 4)
    monkeypatch.setattr(poly_torch, "MIN_BLOCK_ROWS", 1)
    q, k, v = _inputs(2, 2, 23, 3, 4, requires_grad=True)
    blocks = poly_torch.blocking(4, 23, 3 * 4).split(torch.zeros(4, 23, 1))
    assert len(blocks) == 4 * 5 and all(block.shape[0] == 1 for block in blocks)
    grad_out = torch.randn(2, 2, 23, 4, dtype=F64)
    out = poly_kernel_attention(q, k, v, 0.5, 1.3, 2.0)
    ref = poly_kernel_attention_ref(q, k, v, 0.5, 1.3, 2.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10 * ref.abs().max().item())
    grads = torch.autograd.grad((out * grad_out).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * grad_out).sum(), (q, k, v))
    for grad, expected in zip(grads, refs, strict=True):
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10 * expected.abs().max().item())


def test_blocks_group_whole_heads_and_cover_everything():
    for batch_heads, seq_len, width in ((64, 513, 16 * 17), (3, 5000, 16 * 17), (7, 40, 9), (2, 1, 4)):
        plan = poly_torch.blocking(batch_heads, seq_len, width)
        index = torch.arange(batch_heads * seq_len).view(batch_heads, seq_len, 1)
        blocks = plan.split(index)
        states = plan.per_block(torch.arange(batch_heads))  # the head each block's state slice belongs to
        assert len(states) == len(blocks)
        for block, state in zip(blocks, states, strict=True):
            assert block.shape[0] == 1 or block.shape[1] == seq_len
            assert block.shape[0] * block.shape[1] * width <= max(
                poly_torch.FEATURE_BLOCK_ELEMENTS, poly_torch.MIN_BLOCK_ROWS * width
            )
            torch.testing.assert_close(block[:, 0, 0] // seq_len, state)
        covered = torch.cat([block.flatten() for block in blocks])
        assert torch.equal(covered, torch.arange(batch_heads * seq_len))


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_normalized_fused_path_matches_composition(masked):
    """The one-node non-causal path (V', kernel, ratio) equals composing the three steps, with gradients."""
    q, k, v = _inputs(2, 3, 29, 4, 4, requires_grad=True)
    mask = torch.ones(2, 29, dtype=torch.bool)
    if masked:
        mask[0, 20:] = False
        mask[1, :3] = False
    first = torch.tensor([0.7, 1.3], dtype=F64).view(2, 1, 1, 1)
    divisor = mask.sum(dim=1, dtype=F64).view(2, 1, 1, 1)
    coefficients = (0.5, 1.1, 1.7)
    mask_arg = mask if masked else None
    augmentation = polynomial.Augmentation(first, divisor, mask_arg)
    fused = polynomial.normalized_poly_attention("torch", q, k, v, augmentation, coefficients, False, F64)
    v_aug = polynomial.augmented_values(v, augmentation)
    composed = polynomial.split_ratio(poly_kernel_attention_ref(q, k, v_aug, *coefficients))
    torch.testing.assert_close(fused, composed, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(fused)
    grads = torch.autograd.grad((fused * grad_out).sum(), (q, k, v))
    refs = torch.autograd.grad((composed * grad_out).sum(), (q, k, v))
    for grad, ref in zip(grads, refs, strict=True):
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-10 * ref.abs().max().item())
    # Every batch entry (first, divisor and mask are per entry), one head, 9 tokens.
    small = [t[:, :1, :9].detach().requires_grad_() for t in (q, k, v)]
    small_mask = None if mask_arg is None else mask_arg[:, :9]
    small_divisor = divisor if mask_arg is None else small_mask.sum(dim=1, dtype=F64).view(2, 1, 1, 1)
    small_augmentation = polynomial.Augmentation(first, small_divisor, small_mask)
    assert gradcheck(
        lambda q, k, v: polynomial.normalized_poly_attention(
            "torch", q, k, v, small_augmentation, coefficients, False, F64
        ),
        small,
        fast_mode=True,
    )


def test_zero_denominator_rows_get_zero_output_and_finite_gradients():
    """A row whose keys are all masked (zero V') divides by 1 and passes no gradient to the denominator."""
    q, k, v = _inputs(1, 1, 6, 2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, True, False, False, False]])
    first = torch.ones(1, 1, 1, 1, dtype=F64)
    augmentation = polynomial.Augmentation(first, None, mask & torch.tensor([[False] * 6]))
    out = polynomial.normalized_poly_attention("torch", q, k, v, augmentation, (0.5, 1.0, 1.0), False, F64)
    assert bool((out == 0).all())
    out.sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
