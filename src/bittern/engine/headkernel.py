"""The engine's C helpers from the native library: the int8 / 6-bit LM head and the per-token decode glue.

They are compiled with the ternary kernels into ``bittern.kernels._bitternc`` when bittern is installed
(``src/bittern/kernels/csrc/bt_engine.c``) and share their thread pool and instruction-set choice
(``bittern.kernels.native.set_threads`` / ``force_scalar``). The decode glue fuses what runs between
the ternary products of one token (residual add + RMSNorm + int8 quantisation, RoPE + KV-cache store +
GQA attention, gated activation + sub-norm + quantisation); ``bt_eng_decode_layers`` runs them and the
ternary products of every block of a decode step in one C call, instead of dozens of small torch
operations (or a dozen ctypes calls) per layer. Without the library the engine computes the same
in torch.

Head arithmetic: ``s = 127 / max(|x|)``, ``q = clamp(round_half_even(x * s), -128, 127)`` (as
:func:`bittern.quant.quantize_activation`), ``acc = q . code_row`` exact in int32,
``y = float(acc) * (scale_row / s)``.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

from .. import hugepages

HEAD_CODES = {"int8": 0, "int6": 1, "int5": 2}
"""Head formats of the C library and their ids (``BT_HEAD_I8``, ``BT_HEAD_I6``, ``BT_HEAD_I5``)."""
_SRC_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_loaded: "HeadKernel | None | bool" = False


class HeadKernel:
    """ctypes bindings of the engine kernels in the native library."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        vp, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        for name, (res, args) in {
            "bt_eng_norm_quant": (i32, [vp, vp, vp, f32, i64, i64, vp, vp, i64, vp, vp]),
            "bt_eng_act_quant": (i32, [vp, i64, i64, i32, vp, f32, vp, i64, vp, vp]),
            "bt_eng_attend": (i32, [vp, i64, i64, i64, i64, vp, vp, vp, vp, vp, vp, i32, i64, vp, vp]),
            "bt_head_row_bytes": (i64, [i32, i64]),
            "bt_head_quantize": (i32, [vp, i32, i64, i64, i32, vp, vp, i32]),
            "bt_head_matmul": (i32, [i32, vp, vp, i64, i64, vp, i64, vp, vp, i64, vp, i64]),
            "bt_head_rows": (i32, [i32, vp, vp, i64, i64, vp, i64, vp]),
            "bt_quantize": (i32, [vp, i32, i64, i64, i64, vp, i64, vp, vp]),
            "bt_eng_decode_layers": (i32, [vp, vp, i64, vp, i64]),
        }.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.norm_quant = lib.bt_eng_norm_quant
        self.act_quant = lib.bt_eng_act_quant
        self.attend = lib.bt_eng_attend
        self.decode_layers = lib.bt_eng_decode_layers
        self._q = torch.empty(0, dtype=torch.int8)
        self._s = torch.empty(0, dtype=torch.float32)
        self._rs = torch.empty(0, dtype=torch.int32)

    def row_bytes(self, fmt: str, cols: int) -> int:
        """Bytes per stored row of ``cols`` columns in head format ``fmt``."""
        return int(self.lib.bt_head_row_bytes(HEAD_CODES[fmt], cols))

    def padded_cols(self, fmt: str, cols: int) -> int:
        """Columns the quantised activations must be zero-padded to for ``fmt``."""
        block = {"int8": 1, "int6": 128, "int5": 256}[fmt]
        return -(-cols // block) * block

    def quantize(self, weight: torch.Tensor, fmt: str, release_source: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row codes ``[rows, row_bytes]`` (uint8) and float32 scales of a float ``[rows, cols]`` table."""
        if weight.dtype not in _SRC_DTYPES or not weight.is_contiguous():
            weight = weight.float().contiguous()
            release_source = False  # a private copy: nothing of the file mapping to drop
        rows, cols = weight.shape
        codes = hugepages.empty((rows, self.row_bytes(fmt, cols)), torch.uint8)  # read whole every token
        scales = torch.empty(rows, dtype=torch.float32)
        rc = self.lib.bt_head_quantize(weight.data_ptr(), _SRC_DTYPES[weight.dtype], rows, cols, HEAD_CODES[fmt],
                                       codes.data_ptr(), scales.data_ptr(), int(release_source))
        if rc == -5:
            raise ValueError("the embedding/head table holds NaN or Inf values")
        if rc != 0:
            raise RuntimeError(f"bt_head_quantize failed ({rc})")
        return codes, scales

    def rows(self, fmt: str, codes: torch.Tensor, scales: torch.Tensor, cols: int, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows for token ids as float32 ``[len(ids), cols]``."""
        ids = ids.to(torch.int64).contiguous().reshape(-1)
        out = torch.empty(ids.numel(), cols, dtype=torch.float32)
        rc = self.lib.bt_head_rows(HEAD_CODES[fmt], codes.data_ptr(), scales.data_ptr(), codes.shape[0], cols,
                                   ids.data_ptr(), ids.numel(), out.data_ptr())
        if rc == -3:
            raise IndexError(f"token id out of range [0, {codes.shape[0]})")
        if rc != 0:
            raise RuntimeError(f"bt_head_rows failed ({rc})")
        return out

    def matmul(self, fmt: str, codes: torch.Tensor, scales: torch.Tensor, cols: int, x: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """``quant(x) @ codes^T * scale`` as float32 ``[T, rows]`` (``x`` float ``[T, cols]``)."""
        x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
        T, N = x.shape[0], codes.shape[0]
        if x.shape[1] != cols:
            raise ValueError(f"hidden size {x.shape[1]} does not match the head's {cols}")
        kp = self.padded_cols(fmt, cols)
        if out is None:
            out = torch.empty(T, N, dtype=torch.float32)
        if self._q.numel() < T * kp:
            self._q = torch.empty(T * kp, dtype=torch.int8)
        if self._s.numel() < T:
            self._s = torch.empty(T, dtype=torch.float32)
            self._rs = torch.empty(T, dtype=torch.int32)
        lib = self.lib
        rc = lib.bt_quantize(x.data_ptr(), 0, T, cols, cols, self._q.data_ptr(), kp, self._s.data_ptr(), self._rs.data_ptr())
        if rc == 0:
            rc = lib.bt_head_matmul(HEAD_CODES[fmt], codes.data_ptr(), scales.data_ptr(), N, cols, self._q.data_ptr(), kp,
                                    self._rs.data_ptr(), self._s.data_ptr(), T, out.data_ptr(), out.stride(0))
        if rc != 0:
            raise RuntimeError(f"LM head product failed ({rc})")
        return out


def load_head_kernel() -> HeadKernel | None:
    """The engine kernels of the native library, or None when it is not built (or BITTERN_NO_HEAD_KERNEL=1)."""
    global _loaded
    with _lock:
        if _loaded is False:
            _loaded = None
            if os.environ.get("BITTERN_NO_HEAD_KERNEL") != "1":
                from ..kernels import native

                lib = native._load()
                if lib is not None:
                    try:
                        _loaded = HeadKernel(lib)
                    except AttributeError:
                        _loaded = None
        return _loaded  # type: ignore[return-value]
