"""Ternary linear layers as the engine runs them: groups of weights that share one input.

A :class:`LinearGroup` holds the weights that read the same activations (q/k/v, gate/up) and writes
their outputs side by side into one preallocated buffer. With the native C library
(:mod:`bittern.kernels.native`) the activations are quantised once per group into preallocated
buffers and each product is written straight into its slice of the output, through the library's C
entry points with every argument precomputed (no per-call checks or allocations). Without it every
weight goes through the kernel seam (``backend.linear``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import get_backend
from ..pack import TernaryWeight


def native_lib() -> tuple[Any, Any] | None:
    """``(native module, ctypes library)`` when the native kernels are built and load here, else None."""
    try:
        from ..kernels import native  # type: ignore[attr-defined]
    except ImportError:
        return None
    if not native.available():
        return None
    return native, native._need()


class LinearGroup:
    """Weights ``[out_i, in]`` applied to one input ``x [T, in]``; outputs concatenated along the last dim."""

    def __init__(self, weights: list[TernaryWeight], norms: list[torch.Tensor | None] | None = None,
                 backend: str | None = None, eps: float = 1e-5) -> None:
        self.backend = get_backend(backend)
        nat = native_lib() if self.backend.name == "native" else None
        self.weights = [self.backend.prepare(w) for w in weights]
        self.norms = norms or [None] * len(weights)
        self.eps = eps
        self.in_features = weights[0].in_features
        self.sizes = [w.out_features for w in weights]
        self.out_features = sum(self.sizes)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(weights))]
        self.fused = nat is not None and all(n is None for n in self.norms)
        self._qbufs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int, int]]] = {}
        if self.fused:
            mod, self._lib = nat
            self._quant = self._lib.bt_quantize
            self._mm = self._lib.bt_matmul_mode
            self._kp = mod.padded_k(self.in_features)
            self._wargs = [(mod.FORMATS[w.layout], w.packed.data_ptr(), w.out_features, w.in_features, float(w.scale))
                           for w in self.weights]

    def _qbuf(self, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int, int, int]]:
        b = self._qbufs.get(T)
        if b is None:
            q = torch.zeros(T, self._kp, dtype=torch.int8)
            s = torch.empty(T, dtype=torch.float32)
            rs = torch.empty(T, dtype=torch.int32)
            b = (q, s, rs, (q.data_ptr(), q.stride(0), s.data_ptr(), rs.data_ptr()))
            if T <= 64:  # decode-sized buffers are kept; prefill-sized ones are made per call
                self._qbufs[T] = b
        return b

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``out[:, a_i:b_i] = x @ W_i^T`` (float32 ``[T, sum(out_i)]``)."""
        T = x.shape[0]
        if out is None:
            out = torch.empty(T, self.out_features, dtype=torch.float32)
        if self.fused:
            if x.dtype != torch.float32 or x.stride(-1) != 1:
                x = x.float().contiguous()
            qbuf = self._qbuf(T)  # keep the buffers alive until the products are done
            qp, ldq, sp, rsp = qbuf[3]
            rc = self._quant(x.data_ptr(), 0, T, self.in_features, x.stride(0) if T > 1 else self.in_features,
                             qp, ldq, sp, rsp)
            if rc:
                raise RuntimeError(f"bt_quantize failed ({rc})")
            optr, ldy = out.data_ptr(), out.stride(0)
            mm = self._mm
            for (fmt, wp, n, k, gamma), off in zip(self._wargs, self.offsets):
                rc = mm(0, fmt, wp, n, k, qp, ldq, rsp, sp, T, gamma, optr + 4 * off, None, ldy)
                if rc:
                    raise RuntimeError(f"bt_matmul failed ({rc})")
            return out
        for w, norm, off, n in zip(self.weights, self.norms, self.offsets, self.sizes):
            xi = x if norm is None else rms_norm(x, norm, self.eps)
            out[:, off : off + n] = self.backend.linear(xi, w)
        return out

    def matmul_quantized(self, qp: int, ldq: int, sp: int, rsp: int, T: int, out: torch.Tensor) -> None:
        """Products from activations already quantised into native buffers (pointers), into ``out``."""
        optr, ldy, mm = out.data_ptr(), out.stride(0), self._mm
        for (fmt, wp, n, k, gamma), off in zip(self._wargs, self.offsets):
            if mm(0, fmt, wp, n, k, qp, ldq, rsp, sp, T, gamma, optr + 4 * off, None, ldy):
                raise RuntimeError("bt_matmul failed")

    @property
    def nbytes(self) -> int:
        """Packed bytes read per token."""
        return sum(w.nbytes for w in self.weights)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` (float32) with gain ``weight``, computed as :class:`bittern.layers.RMSNorm` does."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
