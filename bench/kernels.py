#!/usr/bin/env python
"""Benchmark the native ternary kernels: GEMV vs same-run memory roofline, GEMM G-MAC/s, vs torch F.linear.

    python bench/kernels.py                        # 2B4T, 3B, 7B, 70B shapes; 1 and 2 threads; both formats
    python bench/kernels.py --models 2B4T --json runs/kernels.json
    python bench/kernels.py --threads 1 --cpu-clock   # single thread on a shared, busy machine

All options: ``python bench/kernels.py --help``. The implementation lives in
:mod:`bittern.bench_kernels` (``run_kernel_bench``), which the ``bittern bench kernels`` verb calls too.
"""

import sys

from bittern.bench_kernels import main

if __name__ == "__main__":
    sys.exit(main())
