"""Fused Triton polynomial-kernel attention against explicit N×N references (docs/kernels.md).

Without CUDA the kernels run in Triton's CPU interpreter (float64 ``tl.dot``), so forward and gradients are
checked exactly; the bf16 tensor-core path only runs in the ``gpu`` tests (the interpreter multiplies bf16
dot operands as raw bits). ``test_compiles_for_sm90`` compiles the kernels for an H100 without a GPU.
"""

import os

import torch

# Must precede the first triton import (tests/conftest.py does the same; this keeps the file standalone).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from models.attention.kernels import poly_triton  # noqa: E402
from models.attention.kernels.poly_triton import poly_kernel_attention_triton, poly_kernel_flops  # noqa: E402

try:
    from models.attention.polynomial import poly_kernel_attention_ref
except ImportError:  # written by another module owner; the explicit reference below is the oracle
    poly_kernel_attention_ref = None

F64 = torch.float64
REPO = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _explicit(q, k, v, a, b, c):
    """Σ_j (c + b·s_ij + a·s_ij²) v_j with s = q kᵀ materialised, in the inputs' dtype."""
    scores = q @ k.transpose(-1, -2)
    return (c + b * scores + a * scores.square()) @ v


def _inputs(batch, heads, seq_len, dim, value_dim, dtype=F64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, seq_len, dim)] * 2 + [(batch, heads, seq_len, value_dim)]
    return [torch.randn(s, generator=gen, dtype=F64).to(device=device, dtype=dtype) for s in shapes]


def _grad_out(like, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=gen, dtype=F64).to(device=like.device, dtype=like.dtype)


def _out_and_grads(fn, q, k, v, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


def _assert_close_scaled(actual, expected, tol, what):
    """max |actual − expected| ≤ tol · max(1, max |expected|), computed in float64."""
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} x {scale:.3e}"


# (batch, seq_len, head_dim, value_dim, (a, b, c), tile options). N = 1, 7, 33, 64 and d = 4, 8, 16 with
# e = d + 1, plus a non-power-of-two d and a value width with a 32 + 16 split. Small tiles give several N
# tiles, a partial last tile, several feature blocks and a split state reduction.
CASES = {
    "N1-d4": (1, 1, 4, 5, (0.5, 1.0, 1.0), {}),
    "N7-d8-order1": (2, 7, 8, 9, (0.0, 1.0, 1.0), {}),
    "N33-d16-tiles-split": (1, 33, 16, 17, (-0.3, 0.8, 2.0), {"block_n": 16, "block_a": 4, "n_split": 2}),
    "N64-d8-quadratic-only": (2, 64, 8, 9, (1.0, 0.0, 0.0), {"block_n": 32, "block_a": 2}),
    "N33-d4-split3": (1, 33, 4, 5, (0.5, -1.0, 0.25), {"block_n": 16, "n_split": 3}),
    "N20-d6-e40": (1, 20, 6, 40, (0.7, 1.3, -0.4), {"block_n": 16}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_float64_forward_and_gradients_match_explicit(case):
    batch, seq_len, dim, value_dim, (a, b, c), tiles = CASES[case]
    q, k, v = _inputs(batch, 2, seq_len, dim, value_dim)
    grad_out = _grad_out(v)
    got = _out_and_grads(poly_kernel_attention_triton, q, k, v, grad_out, a=a, b=b, c=c, **tiles)
    refs = [_explicit]
    if poly_kernel_attention_ref is not None:
        refs.append(poly_kernel_attention_ref)
    for ref_fn in refs:
        want = _out_and_grads(ref_fn, q, k, v, grad_out, a=a, b=b, c=c)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert g.dtype == F64 and g.shape == w.shape
            _assert_close_scaled(g, w, 1e-10, f"{name} vs {ref_fn.__name__}")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-5), (torch.float16, 5e-3)], ids=["fp32", "fp16"])
def test_low_precision_matches_float64(dtype, tol):
    # Unit-norm q, k scaled by d^{1/4} as TaylorShift feeds them, so fp16 inputs stay in range.
    q, k, v = _inputs(1, 2, 33, 16, 17)
    q, k = (x / x.norm(dim=-1, keepdim=True) * 16**0.25 for x in (q, k))
    grad_out = _grad_out(v)
    want = _out_and_grads(_explicit, q, k, v, grad_out, a=0.5, b=1.0, c=1.0)
    low = [t.to(dtype) for t in (q, k, v, grad_out)]
    got = _out_and_grads(poly_kernel_attention_triton, *low, a=0.5, b=1.0, c=1.0)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == dtype
        err = (g.double() - w).abs().max().item()
        assert err <= tol * w.abs().max().item(), f"{name}: {err:.3e} > {tol:.0e} x max|ref|"


@pytest.mark.parametrize("needs", ["q", "v", "kv"])
def test_gradient_subsets(needs):
    q, k, v = _inputs(1, 2, 7, 4, 5)
    grad_out = _grad_out(v)
    leaves = {name: t.clone().requires_grad_(name in needs) for name, t in zip("qkv", (q, k, v), strict=True)}
    out = poly_kernel_attention_triton(leaves["q"], leaves["k"], leaves["v"], 0.5, 1.0, 1.0)
    grads = torch.autograd.grad(out, [leaves[n] for n in needs], grad_out)
    want = _out_and_grads(_explicit, q, k, v, grad_out, a=0.5, b=1.0, c=1.0)
    for name, grad in zip(needs, grads, strict=True):
        _assert_close_scaled(grad, want[1 + "qkv".index(name)], 1e-10, f"d{name}")


def test_non_contiguous_inputs():
    q, k, v = _inputs(1, 7, 2, 4, 5)  # [B, N, H, D] transposed to [B, H, N, D] views
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    assert not q.is_contiguous()
    out = poly_kernel_attention_triton(q, k, v, 0.5, 1.0, 1.0)
    _assert_close_scaled(out, _explicit(q, k, v, 0.5, 1.0, 1.0), 1e-10, "out")


def test_empty_sequence():
    q, k, v = _inputs(1, 2, 0, 4, 5)
    assert poly_kernel_attention_triton(q, k, v, 0.5, 1.0, 1.0).shape == (1, 2, 0, 5)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"causal": True}, NotImplementedError, "causal"),
        ({"k": torch.zeros(1, 2, 7, 3, dtype=F64)}, ValueError, "same shape"),
        ({"v": torch.zeros(1, 2, 6, 5, dtype=F64)}, ValueError, r"v must be \[B, H, N, e\]"),
        ({"q": torch.zeros(2, 7, 4, dtype=F64)}, ValueError, r"q must be \[B, H, N, D\]"),
        ({"v": torch.zeros(1, 2, 7, 5, dtype=torch.float32)}, TypeError, "share one dtype"),
        (
            {
                "q": torch.zeros(1, 2, 7, 4, dtype=torch.int64),
                "k": torch.zeros(1, 2, 7, 4, dtype=torch.int64),
                "v": torch.zeros(1, 2, 7, 5, dtype=torch.int64),
            },
            TypeError,
            "not supported",
        ),
        ({"a": float("nan")}, ValueError, "finite"),
        ({"block_n": 24}, ValueError, "power of two"),
        ({"block_n": 8}, ValueError, ">= 16"),
        ({"block_a": 3}, ValueError, "power of two"),
        ({"n_split": 0}, ValueError, "n_split"),
    ],
    ids=[
        "causal",
        "k-shape",
        "v-length",
        "rank",
        "mixed-dtype",
        "int-dtype",
        "nan-coef",
        "block-n-pow2",
        "block-n-min",
        "block-a",
        "n-split",
    ],
)
def test_bad_inputs_raise(change, error, match):
    args = dict(zip("qkv", _inputs(1, 2, 7, 4, 5), strict=True), a=0.5, b=1.0, c=1.0)
    args.update(change)
    with pytest.raises(error, match=match):
        poly_kernel_attention_triton(**args)


def test_flops_count_every_feature():
    # 4·N·d·(d+1)² per head with e = d + 1: 1.42e11 at B=1, h=8, N=16,384, d=64 (docs/kernels.md, cost).
    assert poly_kernel_flops(1, 1, 100, 8, 9) == 4 * 100 * 8 * 9**2
    assert poly_kernel_flops(1, 8, 16384, 64, 65) == pytest.approx(1.42e11, rel=5e-3)


def test_module_imports_without_triton(monkeypatch):
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "triton", None)
    spec = importlib.util.spec_from_file_location("poly_triton_without_triton", poly_triton.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert module.triton is None and module.poly_kernel_flops(1, 1, 10, 4, 5) > 0
    with pytest.raises(RuntimeError, match="needs Triton"):
        module.poly_kernel_attention_triton(*_inputs(1, 1, 3, 4, 5), 0.5, 1.0, 1.0)


_SM90_COMPILE = textwrap.dedent("""
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from models.attention.kernels import poly_triton as P

    q, v = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16), torch.empty(1, 1, 1, 65, dtype=torch.bfloat16)
    cfg = P._make_config(q, v, None, None, None)
    ptr = {"x_ptr": "*bf16", "y_ptr": "*bf16"}
    variants = [
        (P.poly_state_kernel, {**ptr, "state_ptr": "*fp32", "seq_len": "i32", "head_dim": "i32",
                                "tiles_per_split": "i32"}, {}, cfg.block_n_state),
    ]
    apply_sig = {**ptr, "state_ptr": "*bf16", "out_ptr": "*bf16", "dx_ptr": "*bf16", "seq_len": "i32",
                 "head_dim": "i32", "value_dim": "i32", "coef_a": "fp32", "coef_b": "fp32", "coef_c": "fp32"}
    for out, dx in [(True, False), (False, True), (True, True)]:
        variants.append((P.poly_apply_kernel, apply_sig, {"COMPUTE_OUT": out, "COMPUTE_DX": dx},
                         cfg.block_n_grad if dx else cfg.block_n_out))
    for fn, sig, flags, block_n in variants:
        consts = {**P._kernel_args(torch.bfloat16, cfg, block_n), **flags}
        options = {"num_warps": consts.pop("num_warps"), "num_stages": consts.pop("num_stages")}
        # Pointers and head_dim = 64 are 16-divisible, as the launcher would specialise them.
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in sig
                 if sig[n].startswith("*") or n == "head_dim"}
        src = ASTSource(fn, {**sig, **{n: "constexpr" for n in consts}}, constexprs=consts, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert "warp_group_dot" in kernel.asm["ttgir"], "expected Hopper wgmma MMAs"
    print("compiled", len(variants))
""")


@pytest.mark.slow
def test_compiles_for_sm90():
    """The interpreter accepts code that the GPU compiler rejects: compile the anchor config (d = 64, bf16)
    for sm_90 (no GPU needed; ptxas ships with Triton) and check that the MMAs became wgmma."""
    pytest.importorskip("triton.backends.nvidia")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_DEFAULT_FP_FUSION": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    result = subprocess.run(
        [sys.executable, "-c", _SM90_COMPILE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled 4" in result.stdout


def _taylorshift_like_inputs(batch, heads, seq_len, dim, dtype, seed=0):
    """Normalised q, k (× d^{1/4}) and V' = [α·1, V]/N as TaylorShift passes them, on the GPU."""
    q, k, v = _inputs(batch, heads, seq_len, dim, dim, dtype=torch.float32, device="cuda", seed=seed)
    q, k = (x / x.norm(dim=-1, keepdim=True) * dim**0.25 for x in (q, k))
    alpha = (dim / seq_len) ** 0.5
    v_aug = torch.cat([torch.full_like(v[..., :1], alpha), v], dim=-1) / seq_len
    return [t.to(dtype) for t in (q, k, v_aug)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "dim, seq_len, dtype",
    [
        (64, 4096, torch.bfloat16),
        (64, 4096, torch.float16),
        (64, 4096, torch.float32),
        (16, 1024, torch.bfloat16),
        (32, 1024, torch.bfloat16),
        (128, 1024, torch.bfloat16),
    ],
)
def test_gpu_matches_fp32_reference(dim, seq_len, dtype):
    q, k, v = _taylorshift_like_inputs(1, 2, seq_len, dim, dtype)
    grad_out = _grad_out(v)
    got = _out_and_grads(poly_kernel_attention_triton, q, k, v, grad_out, a=0.5, b=1.0, c=1.0)
    # Reference from the same rounded inputs in fp32, so the tolerance measures the kernel alone.
    want = _out_and_grads(_explicit, *(t.float() for t in (q, k, v)), grad_out.float(), a=0.5, b=1.0, c=1.0)
    tol = 5e-5 if dtype == torch.float32 else 2e-2
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == dtype
        err = (g.float() - w).abs().max().item()
        assert err <= tol * w.abs().max().item(), f"{name}: {err:.3e} > {tol:.0e} x max|ref|"


@pytest.mark.gpu
@needs_cuda
def test_gpu_extra_memory_is_linear_in_n():
    # The memory target of the fused kernel: fwd+bwd peak ≤ 150 MB beyond the inputs at B=1, h=8, N=16,384,
    # d=64, bf16.
    q, k, v = _taylorshift_like_inputs(1, 8, 16384, 64, torch.bfloat16)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    grad_out = _grad_out(v)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    poly_kernel_attention_triton(q, k, v, 0.5, 1.0, 1.0).backward(grad_out)
    torch.cuda.synchronize()
    extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    assert extra_mb <= 150, f"fwd+bwd used {extra_mb:.0f} MB beyond the inputs"
