"""BitNet b1.58 quantisation: the arithmetic every other module agrees on.

Weights (one scale per tensor, "absmean")::

    gamma = max(mean(|W|), 1e-5)
    codes = clamp(round(W / gamma), -1, 1)          # int8 in {-1, 0, +1}
    W ~= codes * gamma

Activations (one scale per token, i.e. per row of the last dimension, "absmax")::

    s = 127 * (1 / max(max(|x|), 1e-5))            # reciprocal, then multiply: two float32 roundings
    q = clamp(round(x * s), -128, 127)              # int8
    x ~= q / s

The integer product of a token with a ternary weight matrix is then::

    acc = q @ codes.T                               # int32, exact
    y   = float32(acc) * (gamma / s)                # the canonical rescale

All arithmetic is done in float32 whatever the input dtype, and ``round`` is round-half-to-even
(``torch.round``), so every kernel (C, Triton) can reproduce these numbers bit for bit.
Training uses the straight-through estimator: the forward pass sees the quantised values, the
backward pass treats quantisation as the identity.
"""

from __future__ import annotations

import torch

WEIGHT_SCALE_FLOOR = 1e-5
ACT_ABSMAX_FLOOR = 1e-5
ACT_QMAX = 127.0


class NonFiniteError(ValueError):
    """Raised when NaN or Inf reaches a quantiser that would otherwise emit garbage codes."""


def check_finite(x: torch.Tensor, what: str = "tensor") -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if ``x`` holds NaN or Inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"{what}: {bad} non-finite value(s) (NaN or Inf); refusing to quantise")


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Absmean scale gamma of a weight tensor: a float32 scalar tensor, floored at 1e-5."""
    return w.detach().float().abs().mean().clamp(min=WEIGHT_SCALE_FLOOR)


def ternary_codes(w: torch.Tensor, gamma: torch.Tensor | None = None) -> torch.Tensor:
    """Ternary codes of ``w`` (int8 in {-1, 0, 1}) under the absmean scale ``gamma``."""
    if gamma is None:
        gamma = weight_scale(w)
    return torch.clamp(torch.round(w.detach().float() / gamma), -1, 1).to(torch.int8)


def quantize_weight(w: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight tensor for packing: returns ``(codes int8, gamma float32 scalar)``.

    With ``check`` (the default) NaN/Inf raise :class:`NonFiniteError` instead of producing codes.
    """
    if check:
        check_finite(w, "weight")
    gamma = weight_scale(w)
    return ternary_codes(w, gamma), gamma


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax scale s = 127 * (1 / max(|x|)) over the last dim, float32, shape ``x.shape[:-1] + (1,)``.

    The reciprocal is taken first and then multiplied by 127 (each step rounded to float32), which is
    what ``127 / tensor`` computes in PyTorch; kernels reproduce exactly these two roundings.
    """
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True).clamp(min=ACT_ABSMAX_FLOOR)
    return amax.reciprocal() * ACT_QMAX


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantisation: returns ``(q int8, s float32)`` with ``x ~= q / s``."""
    s = activation_scale(x)
    q = torch.clamp(torch.round(x.float() * s), -128, 127).to(torch.int8)
    return q, s


def rescale(acc: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Canonical output rescale: ``float32(acc) * (gamma / s)`` (per token s, per tensor gamma)."""
    return acc.to(torch.float32) * (gamma.to(torch.float32) / s.to(torch.float32))


# ----------------------------------------------------------------------------- fake quantisation


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Quantise-dequantise a weight (codes * gamma) in ``w``'s dtype, without gradient tricks."""
    gamma = weight_scale(w)
    return (ternary_codes(w, gamma).float() * gamma).to(w.dtype)


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """Quantise-dequantise activations per token (q / s) in ``x``'s dtype."""
    q, s = quantize_activation(x)
    return (q.float() / s).to(x.dtype)


def ste(x: torch.Tensor, x_quant: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: forward value ``x_quant``, gradient of the identity w.r.t. ``x``."""
    return x + (x_quant - x).detach()


def ste_weight(w: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Weight fake-quantisation with STE; ``strength`` in [0, 1] ramps the quantisation residual in.

    ``strength`` is the lambda of FP-to-ternary fine-tuning (lambda = min(step / warmup, 1)).
    """
    residual = (fake_quant_weight(w) - w).detach()
    return w + residual if strength >= 1.0 else w + strength * residual


def ste_activation(x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Activation fake-quantisation with STE; ``strength`` ramps the residual in as for weights."""
    residual = (fake_quant_activation(x) - x).detach()
    return x + residual if strength >= 1.0 else x + strength * residual
