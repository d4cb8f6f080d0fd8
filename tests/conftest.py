"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def reference_kernels():
    """Pin the reference kernel backend: format tests check layouts, not the speed of whatever is built here."""
    from bittern import kernels

    previous = kernels._active
    kernels.set_backend("reference")
    yield
    kernels._active = previous
