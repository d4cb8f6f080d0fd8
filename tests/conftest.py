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
