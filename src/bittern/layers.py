"""Layers: RMSNorm, BitLinear (training, fake quantisation) and PackedLinear (frozen, packed).

``BitLinear`` is a drop-in replacement for ``nn.Linear(bias=False)``: it keeps a latent float weight
and quantises weights (absmean ternary) and activations (per-token int8) in the forward pass with the
straight-through estimator. ``BitLinear.freeze()`` turns it into a ``PackedLinear`` that holds only
packed ternary codes and runs through the kernel seam (:func:`bittern.kernels.ternary_linear`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import ternary_linear
from .pack import TernaryWeight
from .quant import ste_activation, ste_weight


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learnable gain (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def _fused_training_forward():
    """The fused Triton BitLinear training function when it can run here, else None."""
    try:
        from .kernels.triton_backend import fused_bitlinear
    except ImportError:
        return None
    return fused_bitlinear


class BitLinear(nn.Module):
    """Ternary-weight, int8-activation linear layer for quantisation-aware training.

    Args:
        in_features, out_features: as ``nn.Linear``; there is no bias.
        norm: apply an RMSNorm (with its own gain) to the input first, as in the BitNet FAQ recipe.
        eps: epsilon of that norm.

    ``quant_strength`` (lambda in [0, 1]) blends the quantisation residual in for FP-to-ternary
    fine-tuning; 1.0 (the default) is plain BitNet b1.58.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        if bias:
            raise ValueError("BitLinear has no bias (BitNet b1.58 uses none)")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.norm = RMSNorm(in_features, eps) if norm else None
        self.quant_strength = 1.0
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.quant_strength >= 1.0:
            fused = _fused_training_forward()
            if fused is not None:
                norm_w = self.norm.weight if self.norm is not None else None
                eps = self.norm.eps if self.norm is not None else 0.0
                return fused(x, norm_w, self.weight, eps)
        if self.norm is not None:
            x = self.norm(x)
        xq = ste_activation(x, self.quant_strength)
        wq = ste_weight(self.weight, self.quant_strength)
        return F.linear(xq, wq.to(xq.dtype))

    def freeze(self, layout: str = "2bit") -> "PackedLinear":
        """Quantise the latent weight and return the packed inference twin of this layer."""
        packed = TernaryWeight.from_float(self.weight.detach().float(), layout)
        return PackedLinear(packed, self.norm)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, norm={self.norm is not None}"


class PackedLinear(nn.Module):
    """Inference-only ternary linear layer over packed codes; see :mod:`bittern.kernels`."""

    def __init__(self, weight: TernaryWeight, norm: RMSNorm | None = None, backend: str | None = None) -> None:
        super().__init__()
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.norm = norm
        self.backend = backend
        self.register_buffer("weight_packed", weight.packed, persistent=False)
        self.register_buffer("weight_scale", weight.scale.reshape(()), persistent=False)
        self.layout = weight.layout

    @property
    def ternary(self) -> TernaryWeight:
        """The packed weight as a :class:`TernaryWeight` (views, no copy)."""
        return TernaryWeight(self.weight_packed, self.weight_scale, self.out_features, self.in_features, self.layout)

    def set_ternary(self, weight: TernaryWeight) -> None:
        """Replace the packed weight (e.g. with a kernel-preferred layout of the same codes)."""
        if (weight.out_features, weight.in_features) != (self.out_features, self.in_features):
            raise ValueError("replacement weight has a different shape")
        self.weight_packed = weight.packed
        self.weight_scale = weight.scale.reshape(())
        self.layout = weight.layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return ternary_linear(x, self.ternary, self.backend).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}"


class FPLinear(nn.Linear):
    """Full-precision twin of :class:`BitLinear` (same parameter names, optional input RMSNorm)."""

    def __init__(self, in_features: int, out_features: int, norm: bool = False, eps: float = 1e-5) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.norm = RMSNorm(in_features, eps) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return F.linear(x, self.weight.to(x.dtype))


def make_linear(kind: str, in_features: int, out_features: int, norm: bool = False, eps: float = 1e-5) -> nn.Module:
    """A ``BitLinear`` (kind ``"bitnet"``) or ``FPLinear`` (kind ``"fp"``) of the given shape."""
    if kind == "bitnet":
        return BitLinear(in_features, out_features, norm=norm, eps=eps)
    if kind == "fp":
        return FPLinear(in_features, out_features, norm=norm, eps=eps)
    raise ValueError(f"unknown linear kind {kind!r} (expected 'bitnet' or 'fp')")
