"""Build hook: compiles bittern's native CPU kernels (plain C11, no Python API) into a shared library.

The library is loaded with ctypes from ``bittern.kernels.native``; it is built as an extension
module only so that pip/setuptools compile and install it with the package.
"""

from pathlib import Path

from setuptools import Extension, setup

CSRC = Path("src/bittern/kernels/csrc")
sources = sorted(str(p) for p in CSRC.glob("*.c"))

ext_modules = []
if sources:
    ext_modules.append(
        Extension(
            "bittern.kernels._bitternc",
            sources=sources,
            include_dirs=[str(CSRC)],
            # Portable baseline flags: AVX2/NEON code paths carry their own target attributes and are
            # chosen at run time, so no -march=native. -ffp-contract=off keeps float math bit-exact.
            extra_compile_args=[
                "-O3",
                "-std=c11",
                "-fno-strict-aliasing",
                "-ffp-contract=off",
                "-fno-math-errno",
                "-fvisibility=hidden",
                "-pthread",
            ],
            extra_link_args=["-pthread"],
            libraries=["m"],
        )
    )

setup(ext_modules=ext_modules)
