"""Token embedding and LM head as the engine stores them: float32, bfloat16, or int8 / 6-bit / 5-bit with per-row scales.

The LM head is the largest single read per token (about 40% of the bytes at 2B4T shape in bfloat16),
so it may be stored compactly:

``"f32"``   float32 rows (exact; the reference).
``"bf16"``  bfloat16 rows (the released 2B4T checkpoint's precision).
``"f16"``   float16 rows (what ``bittern model create`` and ``save_packed`` store by default; a stored
            float table in its own dtype is used memory-mapped, without a copy).
``"int8"``  int8 rows with one float32 scale per row (absmax / 127); the hidden state is quantised
            per token to int8 as for the ternary layers, and the product runs in the engine's small
            C kernel (:mod:`bittern.engine.headkernel`, part of the native library).
``"int6"``  6-bit rows (codes in [-31, 31], 0.75 bytes per weight) with one float32 scale per row;
            same activations and kernel family. At 2B4T shape 246 MB instead of int8's 329 MB.
``"int5"``  5-bit rows (codes in [-15, 15], 0.625 bytes per weight): 205 MB at 2B4T shape.

``"auto"`` (the engine's default) picks ``"int6"`` when the hidden size is a multiple of 128 (no padding)
and ``"int8"`` otherwise.

The quality cost of each is measured on a trained model and real text in ``docs/engine.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HEAD_FORMATS = ("f32", "bf16", "f16", "int8", "int6", "int5")
_QMAX = {"int8": 127, "int6": 31, "int5": 15}
_FLOAT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def quantize_rows_int8(w: torch.Tensor, chunk: int = 8192, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax codes in [-qmax, qmax] (as int8) and float32 scales of a ``[rows, cols]`` matrix (chunked)."""
    rows = w.shape[0]
    codes = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    for a in range(0, rows, chunk):
        part = w[a : a + chunk].float()
        if not torch.isfinite(part).all():
            raise ValueError("the embedding/head table holds NaN or Inf values")
        s = part.abs().amax(dim=1).clamp(min=1e-8) / float(qmax)
        codes[a : a + chunk] = torch.round(part / s[:, None]).clamp(-qmax, qmax).to(torch.int8)
        scales[a : a + chunk] = s
    return codes, scales


class TokenTable:
    """A ``[vocab, hidden]`` matrix used as embedding (row lookup) and/or LM head (matrix-vector product)."""

    def __init__(self, weight: torch.Tensor, fmt: str, release_source: bool = False) -> None:
        """``release_source``: ``weight`` is a read-only file mapping whose pages may be dropped once converted."""
        if fmt == "auto":
            fmt = "int6" if weight.shape[1] % 128 == 0 else "int8"
        if fmt not in HEAD_FORMATS:
            raise ValueError(f"unknown embedding/head format {fmt!r}; choose auto or one of {', '.join(HEAD_FORMATS)}")
        self.fmt = fmt
        self.rows, self.cols = weight.shape
        self.scales: torch.Tensor | None = None
        self._kernel = None
        if fmt in _FLOAT:
            self.weight = weight if weight.dtype == _FLOAT[fmt] else weight.to(_FLOAT[fmt])
        else:
            from .headkernel import load_head_kernel

            self._kernel = load_head_kernel()
            if self._kernel is not None:
                self.weight, self.scales = self._kernel.quantize(weight, fmt, release_source=release_source)
            else:  # no native library: one int8 per code, the same arithmetic in torch
                self.weight, self.scales = quantize_rows_int8(weight, qmax=_QMAX[fmt])

    @property
    def nbytes(self) -> int:
        """Bytes of the table (what one full LM-head product reads)."""
        n = self.weight.numel() * self.weight.element_size()
        return n + (self.scales.numel() * 4 if self.scales is not None else 0)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows for token ids ``[N]`` as float32 ``[N, hidden]``."""
        if self._kernel is not None:
            return self._kernel.rows(self.fmt, self.weight, self.scales, self.cols, ids)
        rows = self.weight[ids]
        if self.scales is not None:
            return rows.float() * self.scales[ids, None]
        return rows.float()

    def logits(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, hidden] @ table^T`` as float32 ``[N, vocab]``."""
        if self.fmt == "f32":
            return torch.matmul(x, self.weight.t(), out=out) if out is not None else F.linear(x, self.weight)
        if self.fmt in ("bf16", "f16"):
            y = F.linear(x.to(self.weight.dtype), self.weight).float()
        elif self._kernel is not None:
            return self._kernel.matmul(self.fmt, self.weight, self.scales, self.cols, x, out)
        else:  # no C compiler: same arithmetic in torch (int8 activations, exact int32 sums)
            from ..quant import quantize_activation

            q, s = quantize_activation(x)
            acc = torch.matmul(q.double(), self.weight.double().t()).float()  # exact int sums
            y = acc * (self.scales[None, :] / s)
        if out is not None:
            out.copy_(y)
            return out
        return y
