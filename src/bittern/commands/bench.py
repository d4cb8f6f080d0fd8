"""``bittern bench``: measurements. ``paper`` reproduces the BitNet b1.58 paper's cost tables on this
machine; ``kernels`` (ternary matrix-product kernels) is provided by :mod:`bittern.bench_kernels`.

Other benches add a sub-verb in :func:`register` below, each with a handler calling a library function.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
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
    q.add_argument("--json", default="runs/bench/paper.json",
                   help="JSON output (default: runs/bench/paper.json; '' writes none)")
    q.add_argument("--png", default="runs/bench/paper.png", help="chart output (default: runs/bench/paper.png; '' draws none)")
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


def _check_paper_args(args: argparse.Namespace) -> list[str]:
    """The configs of ``bench paper``, after refusing values it cannot use and unwritable outputs
    (before anything is measured)."""
    from ..configs import get_config
    from ..engine.generate import MAX_THREADS
    from ..output_dir import check_distinct, check_output_file

    for flag, value in (("--max-batch", args.max_batch), ("--scaled-layers", args.scaled_layers),
                        ("--prompt-len", args.prompt_len), ("--throughput-ctx", args.throughput_ctx)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.decode_steps < 2:
        raise UsageError(f"--decode-steps must be at least 2 (the first one is untimed), got {args.decode_steps}")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise UsageError(f"--threads must be between 1 and {MAX_THREADS}, got {args.threads}")
    for flag, value in (("--timeout", args.timeout), ("--budget-gb", args.budget_gb),
                        ("--full-limit-gb", args.full_limit_gb)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a positive number, got {value}")
    if args.throughput_ctx <= args.prompt_len:
        raise UsageError("--throughput-ctx must be larger than --prompt-len")
    configs = _csv(args.configs)
    if not configs:
        raise UsageError("--configs names no config")
    for c in configs:
        get_config(c)  # an unknown name fails here
    for flag, path in (("--json", args.json), ("--png", args.png)):
        if path:
            check_output_file(path, flag, create_parents=True)
    check_distinct({"--json": args.json, "--png": args.png})
    return configs


def run_paper(args: argparse.Namespace) -> int:
    """``bittern bench paper``: the table, the JSON and the chart; exit status 1 when no config could be measured."""
    from ..eval.paper_bench import BenchSettings, format_table, plot, run_paper_bench

    configs = _check_paper_args(args)
    settings = BenchSettings(fp_dtype=args.fp_dtype, prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                             throughput_ctx=args.throughput_ctx, budget=args.budget_gb * 1e9 if args.budget_gb else None,
                             max_batch=args.max_batch, full_limit=args.full_limit_gb * 1e9,
                             scaled_layers=args.scaled_layers, threads=args.threads, timeout=args.timeout)
    result = run_paper_bench(configs, settings)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    if args.png:
        print(f"chart: {plot(result, args.png)}")
    failed = [r["config"] for r in result["rows"] if not r.get("ratios")]
    if failed and len(failed) == len(result["rows"]):
        print(f"bittern bench: error: every measurement failed ({', '.join(failed)}); see the table above",
              file=sys.stderr)
        return 1
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
