"""Token embedding and LM head as the engine stores them: float32, bfloat16 or int8 with per-row scales.

The LM head is the largest single read per token (about 40% of the bytes at 2B4T shape in bfloat16),
so it may be stored compactly:

``"f32"``   float32 rows (exact; the reference).
``"bf16"``  bfloat16 rows (the released 2B4T checkpoint's precision).
``"f16"``   float16 rows (what ``bittern model create`` and ``save_packed`` store by default; a stored
            float table in its own dtype is used memory-mapped, without a copy).
``"int8"``  int8 rows with one float32 scale per row (absmax / 127); the hidden state is quantised
            per token to int8 as for the ternary layers, and the product runs in the engine's small
            C kernel (:mod:`bittern.engine.headkernel`) when a C compiler is available.

The quality cost of each is measured on a trained model and real text in ``docs/engine.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HEAD_FORMATS = ("f32", "bf16", "f16", "int8")
_FLOAT = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def quantize_rows_int8(w: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 codes and float32 scales of a ``[rows, cols]`` matrix (chunked: low peak memory)."""
    rows = w.shape[0]
    codes = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(rows, dtype=torch.float32)
    for a in range(0, rows, chunk):
        part = w[a : a + chunk].float()
        s = part.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        codes[a : a + chunk] = torch.round(part / s[:, None]).clamp(-127, 127).to(torch.int8)
        scales[a : a + chunk] = s
    return codes, scales


class TokenTable:
    """A ``[vocab, hidden]`` matrix used as embedding (row lookup) and/or LM head (matrix-vector product)."""

    def __init__(self, weight: torch.Tensor, fmt: str, release_source: bool = False) -> None:
        """``release_source``: ``weight`` is a read-only file mapping whose pages may be dropped once converted."""
        if fmt not in HEAD_FORMATS:
            raise ValueError(f"unknown embedding/head format {fmt!r}; choose one of {', '.join(HEAD_FORMATS)}")
        self.fmt = fmt
        self.rows, self.cols = weight.shape
        self.scales: torch.Tensor | None = None
        self._kernel = None
        if fmt in _FLOAT:
            self.weight = weight if weight.dtype == _FLOAT[fmt] else weight.to(_FLOAT[fmt])
        else:
            from .headkernel import load_head_kernel

            self._kernel = load_head_kernel()
            codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
            if self._kernel is not None and weight.dtype in codes and weight.is_contiguous():
                self.weight = torch.empty(weight.shape, dtype=torch.int8)
                self.scales = torch.empty(weight.shape[0], dtype=torch.float32)
                self._kernel.quant_rows(weight.data_ptr(), codes[weight.dtype], self.rows, self.cols,
                                        self.weight.data_ptr(), self.scales.data_ptr(), int(release_source))
            else:
                self.weight, self.scales = quantize_rows_int8(weight)

    @property
    def nbytes(self) -> int:
        """Bytes of the table (what one full LM-head product reads)."""
        n = self.weight.numel() * self.weight.element_size()
        return n + (self.scales.numel() * 4 if self.scales is not None else 0)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows for token ids ``[N]`` as float32 ``[N, hidden]``."""
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
            return self._kernel.matmul(self.weight, self.scales, x, out)
        else:  # no C compiler: same arithmetic in torch (int8 activations, exact int32 sums)
            from ..quant import quantize_activation

            q, s = quantize_activation(x)
            acc = torch.matmul(q.double(), self.weight.double().t()).float()  # exact int sums
            y = acc * (self.scales[None, :] / s)
        if out is not None:
            out.copy_(y)
            return out
        return y
