"""The seam between models and matrix-product kernels.

A *backend* turns float activations and a packed :class:`~bittern.pack.TernaryWeight` into float32
outputs, exactly as :mod:`bittern.kernels.reference` defines. Models call :func:`ternary_linear`
and nothing else; fast backends (native C on CPU, Triton on CUDA) register here and are tested
bit-for-bit against the reference.

Backend protocol: ``name``, ``available() -> bool``, ``prepare(weight) -> weight`` (convert once to
the layout the backend wants) and ``linear(x, weight) -> y``.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from ..pack import TernaryWeight
from .reference import ReferenceBackend


class TernaryBackend(Protocol):
    """What a ternary matrix-product backend provides."""

    name: str

    def available(self) -> bool: ...

    def prepare(self, weight: TernaryWeight) -> TernaryWeight: ...

    def linear(self, x: torch.Tensor, weight: TernaryWeight) -> torch.Tensor: ...


_BACKENDS: dict[str, TernaryBackend] = {"reference": ReferenceBackend()}
_AUTO_ORDER = ["triton", "native", "reference"]
_active: str | None = os.environ.get("BITTERN_BACKEND") or None


def register_backend(backend: TernaryBackend) -> None:
    """Make a backend selectable by its name."""
    _BACKENDS[backend.name] = backend


def _load_optional_backends() -> None:
    for name, module in (("native", "native"), ("triton", "triton_backend")):
        if name in _BACKENDS:
            continue
        try:
            mod = __import__(f"{__name__}.{module}", fromlist=["BACKEND"])
        except ImportError:
            continue
        backend = getattr(mod, "BACKEND", None)
        if backend is not None:
            register_backend(backend)


def available_backends() -> list[str]:
    """Names of the backends usable on this machine."""
    _load_optional_backends()
    return [name for name, b in _BACKENDS.items() if b.available()]


def get_backend(name: str | None = None, device: torch.device | str | None = None) -> TernaryBackend:
    """The named backend, or the best available one for ``device`` when ``name`` is None/"auto"."""
    _load_optional_backends()
    name = name or _active or "auto"
    if name != "auto":
        if name not in _BACKENDS:
            raise ValueError(f"unknown kernel backend {name!r}; known: {sorted(_BACKENDS)}")
        backend = _BACKENDS[name]
        if not backend.available():
            raise ValueError(f"kernel backend {name!r} is not available on this machine"
                             + (" (it needs an NVIDIA GPU and triton)" if name == "triton" else "")
                             + f"; available: {available_backends()}")
        return backend
    is_cuda = device is not None and torch.device(device).type == "cuda"
    for candidate in _AUTO_ORDER:
        backend = _BACKENDS.get(candidate)
        if backend is None or not backend.available():
            continue
        if candidate == "triton" and not is_cuda:
            continue
        if candidate == "native" and is_cuda:
            continue
        return backend
    return _BACKENDS["reference"]


def set_backend(name: str | None) -> None:
    """Choose the backend used by :func:`ternary_linear` (None or "auto" picks the best)."""
    global _active
    if name not in (None, "auto"):
        get_backend(name)
    _active = None if name == "auto" else name


def ternary_linear(x: torch.Tensor, weight: TernaryWeight, backend: str | None = None) -> torch.Tensor:
    """``y = x @ W^T`` for a packed ternary ``W`` with per-token int8 activations (float32 out)."""
    return get_backend(backend, x.device).linear(x, weight)
