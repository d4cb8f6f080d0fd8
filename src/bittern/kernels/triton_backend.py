"""The Triton (GPU) backend: W2A8 ternary GEMV/GEMM for inference and a fused BitLinear for training.

This module always imports. Without ``triton`` installed, ``BACKEND.available()`` is False and the
name ``fused_bitlinear`` does not exist (``from ... import fused_bitlinear`` raises ImportError,
which is how :mod:`bittern.layers` detects it). With ``triton`` it is usable where a CUDA device is
present, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is first imported in the process; note that ``torch.optim`` imports it): that is how the
tests check every kernel bit for bit on a machine without GPU.

* :class:`TritonBackend` (``BACKEND``, name ``"triton"``) implements the seam of
  :mod:`bittern.kernels`: ``prepare`` converts a weight to the ``"2bit-k64"`` layout of
  :mod:`bittern.pack` (free for a ``"2bit"`` weight whose rows are whole 16-byte blocks);
  ``linear`` equals :class:`~bittern.kernels.reference.ReferenceBackend` exactly (quantise +
  dp4a GEMV for up to 4 rows, quantise + int8 tensor-core GEMM beyond).
* ``fused_bitlinear(x, norm_weight, weight, eps)`` is the training forward of
  :class:`~bittern.layers.BitLinear` as one ``torch.autograd.Function``: a Triton kernel does
  RMSNorm + per-token activation fake-quant in one pass, another the weight fake-quant, the matmuls
  go to cuBLAS; backward is the straight-through estimator through the RMSNorm (Triton kernel).
  Under autocast the matmuls run in the autocast dtype, as ``F.linear`` would.

CUDA-graph capture of a decode step lives in :mod:`bittern.gpu` (GPU only).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import torch.nn.functional as F

from ..pack import TernaryWeight
from ..quant import weight_scale

LAYOUT = "2bit-k64"
"""The packed layout the Triton kernels read (see :mod:`bittern.pack`)."""

# ``triton`` itself is imported only when a kernel is first needed: Triton decides at import time
# whether its own library functions run compiled or interpreted, so importing it here (the seam
# imports this module to discover backends) would fix that choice before TRITON_INTERPRET is set.
HAVE_TRITON = importlib.util.find_spec("triton") is not None
_IMPORT_ERROR: BaseException | None = None


def interpreting() -> bool:
    """True when the Triton interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_usable() -> bool:
    """Triton is installed (and imports), and there is a CUDA device or the interpreter is on."""
    if not HAVE_TRITON or not (interpreting() or torch.cuda.is_available()):
        return False
    try:
        _kernels()
    except ImportError:
        return False
    return True


_KERNELS: Any = None


def _kernels() -> Any:
    """The kernel module, imported on first use (its kernels bind interpreter mode at import).

    Raises ImportError when triton is missing or does not import.
    """
    global _KERNELS, _IMPORT_ERROR
    if _KERNELS is None:
        if not HAVE_TRITON:
            raise ImportError("the Triton backend needs the 'triton' package")
        if _IMPORT_ERROR is not None:
            raise ImportError(f"triton does not import: {_IMPORT_ERROR}")
        try:
            from . import triton_kernels
        except Exception as e:  # a broken install: the backend is simply unavailable
            _IMPORT_ERROR = e
            raise ImportError(f"triton does not import: {e}") from e
        _KERNELS = triton_kernels
    return _KERNELS


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting() and _kernels().INTERPRET:
        return
    raise RuntimeError(f"Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1 set "
                       f"before the kernels are first used); got a tensor on {t.device}")


def weight_words(weight: TernaryWeight) -> torch.Tensor:
    """The int32 ``[N, 4 * ceil(K/64)]`` view the kernels read of a ``"2bit-k64"`` weight (no copy)."""
    if weight.layout != LAYOUT:
        raise ValueError(f"weight is in layout {weight.layout!r}; call TritonBackend.prepare first")
    packed = weight.packed.contiguous()
    if packed.data_ptr() % 16:
        packed = packed.clone()  # e.g. an unaligned memory-mapped tensor
    return packed.view(torch.int32)


class TritonBackend:
    """Ternary linear on the GPU (or under the Triton interpreter), bit-exact with the reference."""

    name = "triton"

    def available(self) -> bool:
        """True when triton imports and a CUDA device is present or ``TRITON_INTERPRET=1``."""
        return triton_usable()

    def prepare(self, weight: TernaryWeight) -> TernaryWeight:
        """The same weight in the ``"2bit-k64"`` layout, on its original device."""
        if weight.layout == LAYOUT:
            return weight
        if weight.layout == "2bit" and weight.in_features % 64 == 0:  # same bytes: relabel, no copy
            return TernaryWeight(weight.packed, weight.scale, weight.out_features, weight.in_features, LAYOUT)
        device = weight.packed.device
        cpu = TernaryWeight(weight.packed.cpu(), weight.scale.cpu(), weight.out_features, weight.in_features,
                            weight.layout)
        out = cpu.to_layout(LAYOUT)
        return TernaryWeight(out.packed.to(device), out.scale.to(device), out.out_features, out.in_features, LAYOUT)

    def linear(self, x: torch.Tensor, weight: TernaryWeight) -> torch.Tensor:
        """``y[..., out] = rescale(quant(x) @ codes.T)`` in float32, exactly as the reference."""
        if x.shape[-1] != weight.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, weight expects {weight.in_features}")
        weight = self.prepare(weight)
        _check_device(x)
        if weight.packed.device != x.device:
            raise ValueError(f"input is on {x.device} but the weight is on {weight.packed.device}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, weight.in_features)
        if x2.shape[0] == 0:
            return torch.zeros(*lead, weight.out_features, dtype=torch.float32, device=x.device)
        if not x2.is_floating_point():
            x2 = x2.float()
        x2 = x2.contiguous()
        gamma = weight.scale.to(device=x.device, dtype=torch.float32).reshape(1)
        y = _kernels().ternary_linear(x2, weight_words(weight), gamma, weight.in_features)
        return y.reshape(*lead, weight.out_features)


BACKEND = TritonBackend()


# ----------------------------------------------------------------------------- training


class _FusedBitLinear(torch.autograd.Function):
    """y = fq_act(rmsnorm(x) * nw) @ fq_weight(W)^T; backward: STE through both quantisers."""

    @staticmethod
    def forward(ctx, x, norm_weight, weight, eps, compute_dtype):  # noqa: D401
        kern = _kernels()
        K = x.shape[-1]
        x2 = x.reshape(-1, K).contiguous()
        nw = norm_weight.contiguous() if norm_weight is not None else None
        xq, rstd = kern.norm_act_quant(x2, nw, eps, compute_dtype)
        w = weight.contiguous()
        gamma = weight_scale(w).reshape(1)
        wq = kern.weight_fake_quant(w, gamma, compute_dtype)
        y = F.linear(xq, wq)
        ctx.save_for_backward(x2, nw, rstd, xq, wq)
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, nw, rstd, xq, wq = ctx.saved_tensors
        dy2 = dy.reshape(-1, wq.shape[0]).to(wq.dtype).contiguous()
        dx = dnw = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                dxq = dy2 @ wq                                   # STE: d fq_act = identity
                if nw is not None:
                    dx, dnw = _kernels().norm_backward(x2, nw, dxq.contiguous(), rstd)
                    dnw = dnw.to(nw.dtype)
                else:
                    dx = dxq.to(ctx.x_dtype)
                dx = dx.reshape(ctx.x_shape)
            if ctx.needs_input_grad[2]:
                dw = (dy2.t() @ xq).to(ctx.w_dtype)             # STE: d fq_weight = identity
        return dx, dnw, dw, None, None


def _fused_bitlinear(x: torch.Tensor, norm_weight: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """Fused BitLinear training forward (RMSNorm if ``norm_weight`` is given, fake quant, matmul).

    Equals ``F.linear(ste_activation(rmsnorm(x)), ste_weight(weight).to(dtype))`` of
    :class:`bittern.layers.BitLinear` (same rounding; the RMSNorm's rsqrt may differ in the last
    bit on a GPU), with the straight-through estimator's gradients for ``x``, ``norm_weight`` and
    ``weight``. ``eps`` is ignored without a norm.
    """
    _check_device(x)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = x.dtype
    with torch.autocast(device_type, enabled=False):
        return _FusedBitLinear.apply(x, norm_weight, weight, float(eps), compute_dtype)


def __getattr__(name: str) -> Any:
    # ``fused_bitlinear`` exists only where it can run (triton + CUDA, or the interpreter).
    if name == "fused_bitlinear" and triton_usable():
        return _fused_bitlinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
