"""Fixtures shared by several test modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def reference_kernels():
    """Pin the reference kernel backend: format tests check layouts, not the speed of whatever is built here."""
    from bittern import kernels

    previous = kernels._active
    kernels.set_backend("reference")
    yield
    kernels._active = previous


@pytest.fixture(autouse=True, scope="module")
def _kernel_state_is_restored(request):
    """Every test module leaves the kernel backend, ISA and thread count as it found them (a module that
    pinned the reference backend once made every later engine test run the torch fallback)."""
    from bittern import kernels
    from bittern.kernels import native

    def state() -> tuple:
        return (kernels._active,) + ((native.isa(), native.get_threads()) if native.available() else ())

    before = state()
    yield
    after = state()
    if after != before:
        kernels._active = before[0]
        if native.available():
            native.set_isa(before[1])
            native.set_threads(before[2])
        pytest.fail(f"{request.module.__name__} changed the kernel state {before} -> {after} and did not restore it")
