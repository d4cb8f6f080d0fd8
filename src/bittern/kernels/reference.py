"""The reference ternary matrix product in plain PyTorch: the twin every fast kernel must equal.

It follows :mod:`bittern.quant` literally: per-token int8 activations, unpacked int8 codes, an
int32 matrix product, then the canonical rescale ``float32(acc) * (gamma / s)``.
"""

from __future__ import annotations

import torch

from ..pack import TernaryWeight
from ..quant import quantize_activation, rescale


def int_matmul(q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact int32 product ``q @ codes.T`` of int8 activations ``[n, in]`` and codes ``[out, in]``."""
    return torch.matmul(q.to(torch.int32), codes.to(torch.int32).t())


class ReferenceBackend:
    """Pure-PyTorch ternary linear: slow, exact, and the definition of correct."""

    name = "reference"

    def available(self) -> bool:
        """Always available."""
        return True

    def prepare(self, weight: TernaryWeight) -> TernaryWeight:
        """Any layout works: the reference unpacks on every call."""
        return weight

    def linear(self, x: torch.Tensor, weight: TernaryWeight) -> torch.Tensor:
        """``y[..., out] = rescale(quant(x) @ codes.T)`` in float32."""
        if x.shape[-1] != weight.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, weight expects {weight.in_features}")
        lead = x.shape[:-1]
        q, s = quantize_activation(x.reshape(-1, weight.in_features))
        acc = int_matmul(q, weight.codes())
        return rescale(acc, s, weight.scale).reshape(*lead, weight.out_features)
