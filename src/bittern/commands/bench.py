"""``bittern bench``: measurements. ``paper`` reproduces the BitNet b1.58 paper's cost tables on this
machine; ``kernels`` (ternary matrix-product kernels) is provided by :mod:`bittern.bench_kernels`.

Other benches add a sub-verb in :func:`register` below, each with a handler calling a library function.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: the paper's cost tables (paper), ternary kernels (kernels)")
    verbs = p.add_subparsers(dest="bench_command", metavar="WHAT")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    q = verbs.add_parser("paper", help="BitNet b1.58 vs FP LLaMA of the same shape: memory, latency, throughput, energy")
    q.add_argument("--configs", default="700M,1.3B,3B,70B",
                   help="comma-separated named configs (700M, 1.3B, 3B, 3.9B, 7B, 13B, 70B, 100B, ...; default: 700M,1.3B,3B,70B)")
    q.add_argument("--fp-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the FP baseline and of both models' embeddings/head (default bfloat16: CPU PyTorch runs float16 slowly)")
    q.add_argument("--budget-gb", type=float, help="memory budget for the throughput batch (default: 1.15x the config's FP16 weights)")
    q.add_argument("--max-batch", type=int, default=32, help="cap on the throughput batch (default: 32)")
    q.add_argument("--full-limit-gb", type=float, default=8.0,
                   help="configs whose FP weights exceed this are measured per layer and scaled (default: 8)")
    q.add_argument("--scaled-layers", type=int, default=1, help="blocks built for a scaled measurement (default: 1)")
    q.add_argument("--prompt-len", type=int, default=32, help="prompt tokens before the timed decode steps (default: 32)")
    q.add_argument("--decode-steps", type=int, default=6, help="decode steps at batch 1, the first one untimed (default: 6)")
    q.add_argument("--throughput-ctx", type=int, default=128, help="sequence length the throughput batch is sized for (default: 128)")
    q.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    q.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per model measurement (default: 600)")
    q.add_argument("--json", default="runs/bench/paper.json", help="JSON output (default: runs/bench/paper.json)")
    q.add_argument("--png", default="runs/bench/paper.png", help="chart output (default: runs/bench/paper.png)")
    q.set_defaults(handler=run_paper)

    k = verbs.add_parser("kernels", help="ternary matrix-product kernels: GEMV/GEMM speed by shape and threads")
    add_kernel_bench_arguments(k)
    k.set_defaults(handler=run_kernels)


def add_kernel_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The kernel bench's options, shared by ``bittern bench kernels`` and ``bench/kernels.py``."""
    p.add_argument("--models", "--shapes", dest="models", default="2B4T,3B,7B,70B",
                   help="comma-separated model shapes whose linear layers to time (2B4T, 3B, 7B, 70B; default: all)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: 1,2)")
    p.add_argument("--formats", default=None,
                   help="comma-separated packed layouts (2bit-r4, 1.6bit-r4, 1.67bit-lut; default: all)")
    p.add_argument("--gemm-tokens", type=int, default=128, help="tokens for the GEMM measurement (0: skip)")
    p.add_argument("--reps", type=int, default=5, help="rounds per measurement (best is reported)")
    p.add_argument("--min-mb", type=float, default=96.0, help="GEMV weight copies total at least this many MB")
    p.add_argument("--no-torch", action="store_true", help="skip the torch F.linear comparison")
    p.add_argument("--cpu-clock", action="store_true", help="time with the thread CPU clock (1 thread only)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--llama-cpp", default=None, metavar="GGUF",
                   help="also time llama.cpp's prompt speed on this GGUF (the first model's shape, e.g. TQ2_0) in "
                        "the same run and compare the whole-block GEMM rate with it (needs llama-cpp-python)")
    p.add_argument("--small-pages", action="store_true",
                   help="keep packed weights on ordinary 4 KB pages (default: transparent huge pages where available)")


def run_paper(args: argparse.Namespace) -> int:
    from ..eval.paper_bench import BenchSettings, format_table, plot, run_paper_bench

    if args.max_batch < 1 or args.scaled_layers < 1 or args.timeout <= 0:
        raise UsageError("--max-batch, --scaled-layers and --timeout must be positive")
    if args.budget_gb is not None and args.budget_gb <= 0:
        raise UsageError("--budget-gb must be positive")
    settings = BenchSettings(fp_dtype=args.fp_dtype, prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                             throughput_ctx=args.throughput_ctx, budget=args.budget_gb * 1e9 if args.budget_gb else None,
                             max_batch=args.max_batch, full_limit=args.full_limit_gb * 1e9,
                             scaled_layers=args.scaled_layers, threads=args.threads, timeout=args.timeout)
    if settings.throughput_ctx <= settings.prompt_len:
        raise UsageError("--throughput-ctx must be larger than --prompt-len")
    result = run_paper_bench(_csv(args.configs), settings)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    if args.png:
        print(f"chart: {plot(result, args.png)}")
    return 0


def run_kernels(args: argparse.Namespace) -> int:
    try:
        from ..bench_kernels import run_from_args  # type: ignore[import-not-found]
    except ImportError as e:
        raise UsageError(f"the kernel bench is not available in this build (bittern.bench_kernels: {e})") from None
    try:
        run_from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0
