"""The options of TaylorShift and Fastmax, each a frozen dataclass validated once and passed to the fast path,
the reference and the module; every option is documented in its ``conf/attention/<name>.yaml``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.attention.base import require, require_choice, require_probability
from models.attention.crossover import threshold_n0
from models.attention.kernels import IMPLS
from models.attention.kernels.poly_torch import Coefficients


@dataclass(frozen=True)
class TaylorShiftOptions:
    """TaylorShift's options, validated once; each is documented in ``conf/attention/taylorshift.yaml``."""

    mode: str = "auto"
    n0: int | str = "table"
    a: float = 0.5
    b: float = 1.0
    c: float = 1.0
    output_norm: bool = True
    normalize_input: bool = True
    causal: bool = False
    dropout: float = 0.0
    impl: str = "auto"
    tau_init: float = 1.0
    mask_padding: bool = True

    def __post_init__(self) -> None:
        n0_choices = ("table", "theory")
        n0_ok = self.n0 in n0_choices or (type(self.n0) is int and self.n0 >= 0)
        require_choice("taylorshift", "mode", self.mode, ("direct", "efficient", "auto"))
        require(n0_ok, f"taylorshift: n0 must be one of {n0_choices} or a non-negative int, got {self.n0!r}")
        require_choice("taylorshift", "impl", self.impl, IMPLS)
        require(
            self.impl != "triton" or self.mode != "direct",
            "taylorshift: impl='triton' selects the kernel of the efficient mode, but mode='direct' never "
            "uses it; use mode='efficient' or 'auto', or impl='torch'",
        )
        require_probability("taylorshift", "dropout", self.dropout)
        require(
            not (self.causal and self.dropout > 0 and self.mode == "efficient"),
            "taylorshift: the efficient mode has no causal dropout; use mode='direct' or dropout=0",
        )
        require(
            self.a > 0 and self.c >= self.b * self.b / (4 * self.a),
            f"taylorshift: f(x) = c + b·x + a·x² must stay positive, which needs a > 0 and c >= b²/(4a); "
            f"got a={self.a}, b={self.b}, c={self.c} (defaults a=0.5, b=1, c=1)",
        )

    @property
    def coefficients(self) -> Coefficients:
        return self.a, self.b, self.c

    def mode_at(
        self,
        seq_len: int,
        head_dim: int,
        dropout: float = 0.0,
        device_kind: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> str:
        """``direct`` or ``efficient``: ``auto`` runs efficient iff N > n0, except under causal dropout."""
        if self.mode != "auto":
            return self.mode
        threshold = threshold_n0(self.n0, device_kind, dtype, head_dim)
        return "efficient" if seq_len > threshold and not (self.causal and dropout > 0) else "direct"

    def efficient_scale(self, head_dim: int) -> float:
        """s = d^(1/4), balancing the constant, linear and quadratic terms (1 without input normalisation)."""
        return head_dim**0.25 if self.normalize_input else 1.0


@dataclass(frozen=True)
class FastmaxOptions:
    """Fastmax's options, validated once; each is documented in ``conf/attention/fastmax.yaml``."""

    order: int = 2
    a0: float = 1.0
    a1: float = 1.0
    a2: float = 0.5
    normalize: str = "maxnorm"
    lim: float = 1.0
    center: bool = False
    temperature: float = 1.0
    causal: bool = False
    allow_global_norm_causal: bool = False
    detach_norm: bool = False
    dropout_mode: str = "none"
    dropout: float = 0.0
    impl: str = "auto"

    def __post_init__(self) -> None:
        order, lim, temperature = self.order, self.lim, self.temperature
        a0, a1, a2 = self.a0, self.a1, self.a2
        require(order in (1, 2), f"fastmax: order must be 1 or 2, got {order!r}")
        require_choice(
            "fastmax", "normalize", self.normalize, ("maxnorm", "running_maxnorm", "scaled", "none")
        )
        require(
            temperature > 0 and lim > 0,
            f"fastmax: temperature and lim must be > 0, got temperature={temperature}, lim={lim}",
        )
        require(
            order == 1 or (a2 > 0 and a0 >= a1 * a1 / (4 * a2)),
            f"fastmax: order 2 needs a2 > 0 and a0 >= a1²/(4·a2) so that the denominator stays positive; "
            f"got a0={a0}, a1={a1}, a2={a2} (defaults 1, 1, 0.5)",
        )
        require(
            order == 2 or lim <= 1,
            f"fastmax: order 1 requires lim <= 1 (f(x) = a0 + a1·x is positive only for x >= -a0/a1), "
            f"got lim={lim}",
        )
        require(
            order == 2 or self.normalize in ("maxnorm", "running_maxnorm"),
            f"fastmax: order 1 needs bounded logits, i.e. normalize='maxnorm' or 'running_maxnorm'; "
            f"normalize={self.normalize!r} can make the denominator negative",
        )
        require(
            order == 2 or a0 >= abs(a1) * lim * lim / temperature,
            f"fastmax: order 1 needs a0 >= |a1|·lim²/T so that f(x) >= 0 for |x| <= lim²/T; "
            f"got a0={a0}, a1={a1}, lim={lim}, temperature={temperature}",
        )
        require_choice("fastmax", "dropout_mode", self.dropout_mode, ("none", "feature", "output_noise"))
        require_probability("fastmax", "dropout", self.dropout)
        require(
            self.dropout == 0 or self.dropout_mode != "none",
            f"fastmax: dropout={self.dropout} needs dropout_mode='feature' or 'output_noise'",
        )
        require(
            not (self.causal and self.normalize == "maxnorm" and not self.allow_global_norm_causal),
            "fastmax: normalize='maxnorm' with causal=true leaks the future through the sequence-global "
            "max; use normalize='running_maxnorm', or set allow_global_norm_causal=true to accept the leak",
        )
        require_choice("fastmax", "impl", self.impl, IMPLS)

    @property
    def logit_coefficients(self) -> Coefficients:
        """(a2, a1, a0) of f on the logits x = q̃·k̃/T (a2 = 0 for order 1)."""
        return (self.a2 if self.order == 2 else 0.0), self.a1, self.a0

    @property
    def coefficients(self) -> Coefficients:
        """(a, b, c) of the kernel on s = q̃·k̃, with T folded in."""
        a2, a1, a0 = self.logit_coefficients
        return a2 / self.temperature**2, a1 / self.temperature, a0
