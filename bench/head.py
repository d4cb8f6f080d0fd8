#!/usr/bin/env python
"""Benchmark the engine's LM-head kernels (int8 / int6 / int5 rows) against a same-run streaming read.

For one token (decode) and a ``vocab x hidden`` table (default: 2B4T's 128256 x 2560) it reports, per
format and thread count: time per product, GB/s of table bytes, and the share of a streaming read of
the same bytes measured in the same loop (the head is bandwidth-bound when that share nears 100%).
The table is larger than the last-level cache, so every product streams it from DRAM.

    python bench/head.py                          # int8, int6, int5; 1 and 2 threads
    python bench/head.py --formats int6,int5 --threads 1 --json runs/head.json
    python bench/head.py --vocab 2000 --reps 300 --threads 1   # cache-resident table: the compute ceiling
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bittern.engine.headkernel import load_head_kernel
from bittern.kernels import native


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(vocab: int, hidden: int, formats: list[str], threads: list[int], reps: int) -> list[dict]:
    kern = load_head_kernel()
    if kern is None:
        raise SystemExit("the native library is not built: the head kernels need it")
    gen = torch.Generator().manual_seed(0)
    table = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, hidden, generator=gen)
    out = torch.empty(1, vocab)
    rows = []
    for fmt in formats:
        codes, scales = kern.quantize(table, fmt)
        nbytes = codes.numel() + scales.numel() * 4
        for th in threads:
            native.set_threads(th)
            t_head, t_read = float("inf"), float("inf")
            for _ in range(reps):  # interleaved: drift and neighbours' load hit both alike
                t_head = min(t_head, _best(lambda: kern.matmul(fmt, codes, scales, hidden, x, out), 1))
                t_read = min(t_read, _best(lambda: native.stream_read(codes, prefetch_bytes=2048), 1))
            row = {"format": fmt, "threads": th, "vocab": vocab, "hidden": hidden, "bytes": nbytes,
                   "ms": t_head * 1e3, "gbps": nbytes / t_head / 1e9, "roof_gbps": codes.numel() / t_read / 1e9,
                   "roof_pct": 100.0 * t_read / t_head}
            rows.append(row)
            print(f"| {fmt} | {th} | {nbytes / 1e6:.0f} | {row['ms']:.2f} | {row['gbps']:.1f} | {row['roof_gbps']:.1f} | "
                  f"{row['roof_pct']:.0f}% |", flush=True)
        del codes, scales
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--formats", default="int8,int6,int5")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", default="", help="write the rows here")
    a = p.parse_args(argv)
    print("| head | threads | MB | ms / token | GB/s | read GB/s (same run) | of read |")
    print("|---|---|---|---|---|---|---|")
    rows = run(a.vocab, a.hidden, a.formats.split(","), [int(t) for t in a.threads.split(",")], a.reps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu_isa": native.isa(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
