"""Fused Triton kernels for attention fast paths, and the choice between them and the PyTorch paths.

Triton is imported lazily, so the project runs its PyTorch paths without it. How the polynomial kernel
works: ``docs/kernels.md``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch
from torch import Tensor

IMPLS = ("auto", "torch", "triton")
_triton_state: tuple[ModuleType | None, str] | None = None


def triton_module() -> tuple[ModuleType | None, str]:
    """The polynomial Triton kernel module, or None and the reason it cannot be used.

    Cached in a module global (torch.compile does not honour ``functools.lru_cache``).
    """
    global _triton_state
    if _triton_state is None:
        _triton_state = _load_triton_module()
    return _triton_state


@torch.compiler.disable
def _load_triton_module() -> tuple[ModuleType | None, str]:
    try:
        importlib.import_module("triton")
    except ImportError as err:
        return None, f"triton is not installed ({err})"
    try:
        return importlib.import_module("models.attention.kernels.poly_triton"), ""
    except ImportError as err:
        return None, f"the kernel module poly_triton cannot be imported ({err})"


def select_impl(impl: str, q: Tensor, causal: bool = False, torch_only: str | None = None) -> str:
    """Resolve ``auto | torch | triton`` to ``"torch"`` or ``"triton"``.

    ``torch_only`` names a feature of this call that the kernel cannot express (e.g. feature dropout):
    ``auto`` then falls back to torch, an explicit ``triton`` raises. Causal inputs go to the kernel only if
    its module sets ``SUPPORTS_CAUSAL = True``.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
    if impl == "torch" or (impl == "auto" and not q.is_cuda):
        return "torch"
    module, why = triton_module()
    if torch_only is None and causal and module is not None and not module.SUPPORTS_CAUSAL:
        torch_only = "causal attention (the kernel module does not set SUPPORTS_CAUSAL = True)"
    if impl == "auto":
        return "triton" if module is not None and torch_only is None else "torch"
    if module is None:
        raise RuntimeError(f"impl='triton' is unavailable: {why}. Use impl='torch' or impl='auto'.")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors, got device {q.device}; use impl='torch', "
            "or set TRITON_INTERPRET=1 to run the kernel in Triton's CPU interpreter"
        )
    if torch_only is not None:
        raise ValueError(
            f"impl='triton' cannot run {torch_only}; use impl='auto' (falls back to torch for "
            "this case) or impl='torch'"
        )
    return "triton"
