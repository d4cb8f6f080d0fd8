"""Kernel benchmark: the native ternary GEMV/GEMM against the memory roofline and torch.nn.functional.linear.

For the linear-layer shapes of 2B4T, 3B, 7B and 70B-shaped models, each packed format ("2bit-r4",
"1.6bit-r4") and each thread count it measures, in one run:

* decode GEMV (one token): seconds per call, packed-weight GB/s, and the same-run memory roofline: a
  streaming read of exactly the same bytes with AVX2 loads on the same threads (the faster of a plain
  and a software-prefetched read), so ``% roof = t_read / t_gemv``; and the same GEMV's GB/s on one
  thread from ~192 KB of rows that stay in cache (``core``: what one core computes; ``% core`` = GB/s
  over threads x core, near 100% means compute-bound, far below means memory-bound);
* ``torch.nn.functional.linear`` on the same shape in float32 and bfloat16 (``x fp32`` = how many times
  faster the ternary kernel is);
* prefill GEMM with ``gemm_tokens`` tokens (default 128): G weight-MACs per second (N*K*T / t) of the
  product ``bt_matmul`` runs at that T (on AVX2 from 10 tokens: the GEMM by tables of token vectors), of
  the decoded-panel GEMM (``panel``), and torch float32/bfloat16 on the same shape.

Weights are random valid packed bytes. GEMV weights (and torch's) rotate over enough copies to exceed
``min_bytes`` (default 96 MB, three times a 32 MB L3), so every call streams from DRAM as a real
decode step does. Kernel loops are timed inside C (no Python in the loop); each number is the best of
``reps`` rounds, measurements of a shape interleaved so drift hits kernel and roofline alike.

``run_kernel_bench(...)`` returns the result dict (and prints a table, writes JSON on request); the
``bittern bench kernels`` verb and ``bench/kernels.py`` are thin wrappers around it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import UsageError
from .hugepages import HugePageArena, huge_pages_available
from .kernels import native as nat
from .pack import TernaryWeight, get_layout


@dataclass(frozen=True)
class ModelShape:
    """Hidden size, FFN size and key/value projection rows of a model family."""

    name: str
    hidden: int
    ffn: int
    kv: int | None  # rows of k_proj/v_proj when they differ from hidden (grouped-query attention)
    num_layers: int = 0

    def block_products(self) -> list[tuple[str, int, int]]:
        """``(layer, out_features, in_features)`` of all seven linear products of one block."""
        h, kv = self.hidden, self.kv or self.hidden
        kv_name = "k/v" if kv != h else "q/o"
        return [("q/o", h, h), (kv_name, kv, h), (kv_name, kv, h), ("q/o", h, h), ("gate/up", self.ffn, h),
                ("gate/up", self.ffn, h), ("down", h, self.ffn)]

    @property
    def ternary_weights(self) -> int:
        """Ternary weights of the whole model (what one token's forward pass multiplies)."""
        return self.num_layers * sum(n * k for _, n, k in self.block_products())

    def layers(self) -> list[tuple[str, int, int]]:
        """``(layer, out_features, in_features)`` of the distinct linear shapes in a block."""
        out = [("q/o", self.hidden, self.hidden)]
        if self.kv and self.kv != self.hidden:
            out.append(("k/v", self.kv, self.hidden))
        out += [("gate/up", self.ffn, self.hidden), ("down", self.hidden, self.ffn)]
        return out


MODELS: dict[str, ModelShape] = {
    "2B4T": ModelShape("2B4T", 2560, 6912, 640, 30),
    "3B": ModelShape("3B", 3200, 8640, None, 26),
    "7B": ModelShape("7B", 4096, 11008, None, 32),
    "70B": ModelShape("70B", 8192, 28672, 1024, 80),
}
FORMATS = ("2bit-r4", "1.6bit-r4", "1.67bit-lut")


def _valid_bytes(layout: str) -> torch.Tensor:
    if layout == "2bit-r4":
        vals = [a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3) for d in range(3)]
    else:
        vals = [((v * 256 + 242) // 243) ^ 0x80 for v in range(243)]
    return torch.tensor(vals, dtype=torch.uint8)


def random_packed(layout: str, n: int, k: int, gen: torch.Generator) -> TernaryWeight:
    """A random ternary weight directly in packed form (fast even for 70B shapes)."""
    if layout not in ("2bit-r4", "1.6bit-r4"):  # no independent random bytes: pack random codes, by rows
        L = get_layout(layout)
        step = max(64, (1 << 24) // max(k, 1) // 64 * 64)  # whole pairs of 32-row groups per chunk
        packed = torch.cat([L.pack(torch.randint(-1, 2, (min(step, n - r), k), generator=gen, dtype=torch.int8))
                            for r in range(0, n, step)])
        return TernaryWeight(packed, torch.tensor(0.05), n, k, layout)
    lut = _valid_bytes(layout)
    cols = get_layout(layout).packed_cols(k)
    idx = torch.randint(0, len(lut), (n, cols), generator=gen)
    return TernaryWeight(lut[idx], torch.tensor(0.05), n, k, layout)


def _copies_for(nbytes: int, min_bytes: float) -> int:
    return max(1, math.ceil(min_bytes / max(nbytes, 1)))


def _best(times: Sequence[float]) -> float:
    return min(times)


def _time_torch(fn: Callable[[int], object], ncopies: int, reps: int, cpu_clock: bool) -> float:
    """Best over ``reps`` rounds of the mean seconds per call, one call per weight copy."""
    clock = time.thread_time if cpu_clock else time.perf_counter
    best = float("inf")
    fn(0)
    for _ in range(reps):
        t0 = clock()
        for i in range(ncopies):
            fn(i)
        best = min(best, (clock() - t0) / ncopies)
    return best


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bench_shape(
    model: str,
    layer: str,
    n: int,
    k: int,
    threads: int,
    formats: Sequence[str],
    gemm_tokens: int,
    reps: int,
    min_bytes: float,
    with_torch: bool,
    cpu_clock: bool,
    gen: torch.Generator,
    log: Callable[[str], None],
    huge_pages: bool = True,
) -> list[dict]:
    rows: list[dict] = []
    nat.set_threads(threads)
    torch.set_num_threads(threads)
    x1 = torch.randn(1, k, generator=gen)
    xt = torch.randn(gemm_tokens, k, generator=gen) if gemm_tokens else None

    torch_t: dict[str, float | None] = {"fp32": None, "bf16": None, "fp32_gemm": None, "bf16_gemm": None}
    if with_torch:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            wbytes = n * k * (4 if dtype == torch.float32 else 2)
            nc = _copies_for(wbytes, min_bytes)
            ws = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(nc)]
            xx = x1.to(dtype)
            with torch.inference_mode():
                torch_t[name] = _time_torch(lambda i: F.linear(xx, ws[i]), nc, reps, cpu_clock)
                if xt is not None:
                    xg = xt.to(dtype)
                    torch_t[name + "_gemm"] = _time_torch(
                        lambda i: F.linear(xg, ws[0]), 1, max(2, reps // 2), cpu_clock
                    )
            del ws

    for layout in formats:
        w = random_packed(layout, n, k, gen)
        nbytes = w.packed.numel()
        nc = _copies_for(nbytes, min_bytes)
        copies = [w] + [random_packed(layout, n, k, gen) for _ in range(nc - 1)]
        if huge_pages:  # where the engine keeps resident weights (bittern.hugepages)
            arena = HugePageArena(HugePageArena.bytes_for([c.packed for c in copies]))
            copies = [replace(c, packed=arena.copy(c.packed)) for c in copies]
            w = copies[0]
        q, s, rs = nat.quantize_activations(x1)
        out = torch.empty(1, n)
        kern, plain, pref = [], [], []
        for _ in range(reps):  # interleaved: drift and neighbours' load hit all three alike
            kern += nat.bench_calls(copies, q, s, rs, out, mode="gemv", rounds=1, cpu_clock=cpu_clock)
            plain += nat.bench_calls(copies, q, s, rs, out, read=True, rounds=1, cpu_clock=cpu_clock)
            pref += nat.bench_calls(
                copies, q, s, rs, out, read=True, rounds=1, prefetch_bytes=2048, cpu_clock=cpu_clock
            )
        t, t_read = _best(kern), min(_best(plain), _best(pref))
        core_gbps = _core_gemv_gbps(layout, n, k, nbytes, threads, q, s, rs, reps, cpu_clock, gen)
        row = {
            "model": model,
            "layer": layer,
            "out_features": n,
            "in_features": k,
            "format": layout,
            "threads": threads,
            "packed_bytes": nbytes,
            "weight_copies": nc,
            "gemv_s": t,
            "gemv_median_s": statistics.median(kern),
            "gemv_gbps": nbytes / t / 1e9,
            "roof_s": t_read,
            "roof_gbps": nbytes / t_read / 1e9,
            "roof_plain_gbps": nbytes / _best(plain) / 1e9,
            "roof_prefetch_gbps": nbytes / _best(pref) / 1e9,
            "roof_pct": 100.0 * t_read / t,
            "gemv_gweights_per_s": n * k / t / 1e9,
            "core_gbps": core_gbps,
            "core_pct": 100.0 * nbytes / t / 1e9 / (threads * core_gbps),
            "torch_fp32_s": torch_t["fp32"],
            "torch_bf16_s": torch_t["bf16"],
            "speedup_vs_fp32": torch_t["fp32"] / t if torch_t["fp32"] else None,
            "speedup_vs_bf16": torch_t["bf16"] / t if torch_t["bf16"] else None,
        }
        if xt is not None:
            qg, sg, rsg = nat.quantize_activations(xt)
            outg = torch.empty(gemm_tokens, n)
            # the product bt_matmul runs at this T (tables of token vectors on AVX2), and the panel GEMM
            tg = _best(nat.bench_calls([w], qg, sg, rsg, outg, mode="auto", rounds=reps, cpu_clock=cpu_clock))
            tp = _best(nat.bench_calls([w], qg, sg, rsg, outg, mode="gemm", rounds=reps, cpu_clock=cpu_clock))
            row.update(
                {
                    "gemm_tokens": gemm_tokens,
                    "gemm_s": tg,
                    "gemm_gmacs": n * k * gemm_tokens / tg / 1e9,
                    "gemm_panel_s": tp,
                    "gemm_panel_gmacs": n * k * gemm_tokens / tp / 1e9,
                    "torch_fp32_gemm_s": torch_t["fp32_gemm"],
                    "torch_bf16_gemm_s": torch_t["bf16_gemm"],
                    "gemm_speedup_vs_fp32": torch_t["fp32_gemm"] / tg if torch_t["fp32_gemm"] else None,
                    "gemm_speedup_vs_bf16": torch_t["bf16_gemm"] / tg if torch_t["bf16_gemm"] else None,
                }
            )
        rows.append(row)
        log(_format_row(row))
        del copies
    return rows


CACHED_BYTES = 192 * 1024
"""Packed bytes of the cache-resident GEMV measurement: well inside a 512 KB L2 with the activations."""


def _core_gemv_gbps(layout: str, n: int, k: int, nbytes: int, threads: int, q: torch.Tensor, s: torch.Tensor,
                    rs: torch.Tensor, reps: int, cpu_clock: bool, gen: torch.Generator) -> float:
    """Packed GB/s one core's GEMV computes when memory is not the limit: one thread, on about CACHED_BYTES
    of rows of the shape's width, called over and over so the weights stay in cache. A DRAM rate near
    ``threads`` times this is compute-bound; far below it, memory-bound."""
    rows = max(64, min(n, int(CACHED_BYTES * n / nbytes) // 64 * 64))
    w = random_packed(layout, rows, k, gen)
    out = torch.empty(1, rows)
    calls = max(20, int(20e6 / w.packed.numel()))  # ~2 ms of work per round at 10 GB/s
    nat.set_threads(1)
    try:
        best = min(_best(nat.bench_calls([w] * calls, q, s, rs, out, mode="gemv", rounds=1, cpu_clock=cpu_clock))
                   for _ in range(max(3, reps)))
    finally:
        nat.set_threads(threads)
    return w.packed.numel() / best / 1e9


_LLAMA_CPP_PROMPT = r"""
import json, sys, time
import llama_cpp
spec = json.loads(sys.argv[1])
llm = llama_cpp.Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                      n_ctx=spec["tokens"] + 8, n_batch=spec["tokens"], n_ubatch=spec["tokens"], verbose=False)
best = 0.0
for rep in range(spec["reps"]):
    ids = [(7 * i + rep) % 1000 + 1 for i in range(spec["tokens"])]
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    best = max(best, spec["tokens"] / (time.perf_counter() - t))
print(json.dumps({"prompt_tok_s": best, "version": llama_cpp.__version__}))
"""


def llama_cpp_prompt_rate(gguf: str, threads: int, tokens: int, reps: int, timeout: float = 1200) -> dict:
    """llama.cpp's prompt speed (tokens/s, best of ``reps``) for a ``tokens``-token prompt on ``gguf``,
    measured with the build inside the installed ``llama-cpp-python`` in a subprocess."""
    import subprocess
    import sys

    spec = {"gguf": str(gguf), "threads": threads, "tokens": tokens, "reps": reps}
    p = subprocess.run([sys.executable, "-c", _LLAMA_CPP_PROMPT, json.dumps(spec)], capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"llama.cpp prompt run failed: {(p.stderr or p.stdout).strip()[-400:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def block_gemm_rate(rows: list[dict], shape: ModelShape, layout: str, threads: int) -> float | None:
    """G weight-MACs/s of one whole block's GEMMs (its seven products, each at its measured time)."""
    t = {r["layer"]: r.get("gemm_s") for r in rows
         if r["model"] == shape.name and r["format"] == layout and r["threads"] == threads}
    products = shape.block_products()
    if any(t.get(layer) is None for layer, _, _ in products):
        return None
    tokens = next(r["gemm_tokens"] for r in rows if r["model"] == shape.name and r.get("gemm_tokens"))
    return sum(n * k for _, n, k in products) * tokens / sum(t[layer] for layer, _, _ in products) / 1e9


_HEADER = (
    f"{'model':5s} {'layer':7s} {'N x K':>12s} {'fmt':11s} {'thr':>3s} | {'GEMV us':>8s} {'Gw/s':>6s} {'GB/s':>6s} "
    f"{'roof':>6s} {'%roof':>6s} {'core':>6s} {'%core':>6s} {'x fp32':>7s} {'x bf16':>7s} | {'GEMM ms':>8s} {'GMAC/s':>7s} {'panel':>6s} "
    f"{'x fp32':>7s} {'x bf16':>7s}"
)


def _fmt(v: float | None, spec: str) -> str:
    return format(v, spec) if v is not None else "-".rjust(len(format(1.0, spec)))


def _format_row(r: dict) -> str:
    shape = f"{r['out_features']}x{r['in_features']}"
    line = (
        f"{r['model']:5s} {r['layer']:7s} {shape:>12s} {r['format']:11s} {r['threads']:3d} | "
        f"{r['gemv_s'] * 1e6:8.1f} {r['gemv_gweights_per_s']:6.1f} {r['gemv_gbps']:6.1f} {r['roof_gbps']:6.1f} {r['roof_pct']:5.0f}% {r['core_gbps']:6.1f} {r['core_pct']:5.0f}% "
        f"{_fmt(r['speedup_vs_fp32'], '7.2f')} {_fmt(r['speedup_vs_bf16'], '7.2f')} |"
    )
    if "gemm_s" in r:
        line += (
            f" {r['gemm_s'] * 1e3:8.2f} {r['gemm_gmacs']:7.1f} {_fmt(r.get('gemm_panel_gmacs'), '6.1f')} "
            f"{_fmt(r['gemm_speedup_vs_fp32'], '7.2f')} "
            f"{_fmt(r['gemm_speedup_vs_bf16'], '7.2f')}"
        )
    return line


def python_call_overhead(reps: int = 2000) -> float:
    """Seconds per :func:`bittern.kernels.native.gemv` call on a tiny matrix (ctypes + checks)."""
    w = random_packed("2bit-r4", 4, 128, torch.Generator().manual_seed(0))
    q, s, rs = nat.quantize_activations(torch.randn(1, 128))
    out = torch.empty(1, 4)
    for _ in range(100):
        nat.gemv(q, s, rs, w, out)
    t0 = time.perf_counter()
    for _ in range(reps):
        nat.gemv(q, s, rs, w, out)
    return (time.perf_counter() - t0) / reps


def run_kernel_bench(
    models: Sequence[str] = ("2B4T", "3B", "7B", "70B"),
    threads: Sequence[int] = (1, 2),
    formats: Sequence[str] = FORMATS,
    gemm_tokens: int = 128,
    reps: int = 5,
    min_bytes: float = 96e6,
    with_torch: bool = True,
    cpu_clock: bool = False,
    json_path: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    huge_pages: bool = True,
    llama_cpp: str | None = None,
) -> dict:
    """Run the kernel benchmark; returns ``{"machine", "settings", "results"}`` (also written to ``json_path``).

    ``cpu_clock`` times with the calling thread's CPU clock instead of the wall clock (only meaningful
    with one thread; it hides time the thread was descheduled on a shared machine). ``huge_pages``:
    packed weights live on transparent huge pages where the OS offers them, as in the engine.
    ``llama_cpp``: a GGUF of the first model's shape; llama.cpp's prompt speed on it (``gemm_tokens``
    tokens) is measured before and after each thread count's shapes, and each format's whole-block
    GEMM rate is reported against it in weight-MACs per second.
    """
    from .engine.generate import MAX_THREADS

    if not models:
        raise ValueError(f"no model shapes given; known: {sorted(MODELS)}")
    if not formats:
        raise ValueError(f"no formats given; known: {list(FORMATS)}")
    if not threads:
        raise ValueError("no thread counts given")
    out_of_range = [t for t in threads if not 1 <= t <= MAX_THREADS]
    if out_of_range:
        raise ValueError(f"thread counts must be between 1 and {MAX_THREADS}, got {out_of_range}")
    if cpu_clock and any(t != 1 for t in threads):
        raise ValueError("cpu_clock only measures the calling thread: use it with threads=(1,)")
    if not (math.isfinite(min_bytes) and min_bytes > 0):
        raise ValueError(f"min_bytes must be a positive number, got {min_bytes}")
    if reps < 1 or gemm_tokens < 0:
        raise ValueError("reps must be at least 1 and gemm_tokens at least 0")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model shape(s) {unknown}; known: {sorted(MODELS)}")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown format(s) {bad}; known: {list(FORMATS)}")
    if llama_cpp:
        if not gemm_tokens:
            raise ValueError("the llama.cpp comparison needs the GEMM measurement (gemm_tokens > 0)")
        if not os.path.isfile(llama_cpp):
            raise ValueError(f"{llama_cpp}: no such GGUF file (for the llama.cpp comparison)")
    if json_path is not None:
        from .output_dir import check_output_file

        check_output_file(json_path, "--json", inputs=[llama_cpp] if llama_cpp else ())
    if not nat.available():
        raise RuntimeError(f"native kernels unavailable: {nat.library_error()}")
    say = log or (lambda _s: None)
    old_threads, old_torch_threads = nat.get_threads(), torch.get_num_threads()
    gen = torch.Generator().manual_seed(seed)
    machine = {
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "isa": nat.isa(),
        "threading": nat.threading_backend(),
        "torch": torch.__version__,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python_gemv_call_overhead_s": python_call_overhead(),
        "weight_pages": "2 MB (transparent huge pages)" if huge_pages and huge_pages_available() else "4 KB",
    }
    settings = {
        "models": list(models),
        "threads": list(threads),
        "formats": list(formats),
        "gemm_tokens": gemm_tokens,
        "reps": reps,
        "min_bytes": min_bytes,
        "clock": "thread-cpu" if cpu_clock else "wall",
        "torch": with_torch,
    }
    say(
        f"# {machine['cpu']} ({machine['cpus']} CPUs), kernels: {machine['isa']}, threads: {machine['threading']}, "
        f"clock: {settings['clock']}, weight pages: {machine['weight_pages']}, load average {machine['loadavg']}"
    )
    say("# GEMV: 1 token, weights rotate over copies > min_bytes (DRAM); roof = same-run streaming read of the")
    say("# same bytes (AVX2 loads, same threads); Gw/s = G weights per second (compares formats of different")
    say("# sizes); core = GB/s of the same GEMV on one thread from ~192 KB of rows that stay in cache (what one")
    say("# core computes), %core = GB/s / (threads x core): near 100% = compute-bound; x fp32/x bf16 = torch")
    say("# F.linear time / kernel time;")
    say(f"# GEMM: {gemm_tokens} tokens, GMAC/s = weights x tokens / s.")
    say(_HEADER)
    results: list[dict] = []
    comparisons: list[dict] = []
    try:
        for th in threads:
            lcpp_runs = [llama_cpp_prompt_rate(llama_cpp, th, gemm_tokens, reps)] if llama_cpp else []
            for m in models:
                for layer, n, k in MODELS[m].layers():
                    results += _bench_shape(
                        m, layer, n, k, th, formats, gemm_tokens, reps, min_bytes, with_torch, cpu_clock, gen, say,
                        huge_pages,
                    )
            if llama_cpp:
                lcpp_runs.append(llama_cpp_prompt_rate(llama_cpp, th, gemm_tokens, reps))
                shape = MODELS[models[0]]
                tok_s = max(r["prompt_tok_s"] for r in lcpp_runs)
                lcpp_gmacs = tok_s * shape.ternary_weights / 1e9
                for layout in formats:
                    ours = block_gemm_rate(results, shape, layout, th)
                    c = {"model": shape.name, "format": layout, "threads": th, "block_gemm_gmacs": ours,
                         "llama_cpp_prompt_tok_s": tok_s, "llama_cpp_runs_tok_s": [r["prompt_tok_s"] for r in lcpp_runs],
                         "llama_cpp_gmacs": lcpp_gmacs, "ratio": ours / lcpp_gmacs if ours else None,
                         "llama_cpp_version": lcpp_runs[0].get("version")}
                    comparisons.append(c)
                    say(f"# {shape.name} {layout} {th} thr: whole-block GEMM {ours:.1f} GMAC/s = {c['ratio']:.2f}x "
                        f"llama.cpp's prompt speed ({tok_s:.1f} tok/s x {shape.ternary_weights / 1e9:.2f} G weights "
                        f"= {lcpp_gmacs:.1f} GMAC/s, best of its runs before and after)")
    finally:
        nat.set_threads(old_threads)
        torch.set_num_threads(old_torch_threads)
    report = {"machine": machine, "settings": settings, "results": results}
    if llama_cpp:
        report["llama_cpp"] = {"gguf": str(llama_cpp), "comparisons": comparisons}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        say(f"# wrote {json_path}")
    return report


def run_from_args(a: argparse.Namespace) -> dict:
    """Run the bench with the options of :func:`bittern.commands.bench.add_kernel_bench_arguments`.

    Raises ValueError (UsageError for an output path) for option values it cannot use (not integers,
    thread counts outside 1..MAX_THREADS, empty or unknown shapes or formats, a missing GGUF), before
    anything is measured."""
    def ints(text: str, name: str) -> list[int]:
        try:
            return [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None

    from .engine.generate import MAX_THREADS

    threads = ints(a.threads, "--threads")
    if not threads or any(t < 1 for t in threads):
        raise ValueError(f"--threads must list positive thread counts, got {a.threads!r}")
    if any(t > MAX_THREADS for t in threads):
        raise ValueError(f"--threads must list thread counts between 1 and {MAX_THREADS}, got {a.threads!r}")
    if a.reps < 1 or a.gemm_tokens < 0 or not (math.isfinite(a.min_mb) and a.min_mb > 0):
        raise ValueError("--reps must be at least 1, --gemm-tokens at least 0 and --min-mb a positive number")
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if not models:
        raise ValueError(f"--models names no model shape; known: {', '.join(MODELS)}")
    formats = [f.strip() for f in a.formats.split(",") if f.strip()] if a.formats is not None else list(FORMATS)
    if not formats:
        raise ValueError(f"--formats names no format; known: {', '.join(FORMATS)}")
    if a.llama_cpp is not None and not os.path.isfile(a.llama_cpp):
        raise ValueError(f"--llama-cpp: {a.llama_cpp}: no such GGUF file")
    return run_kernel_bench(
        models=models,
        threads=threads,
        formats=formats,
        gemm_tokens=a.gemm_tokens,
        reps=a.reps,
        min_bytes=a.min_mb * 1e6,
        with_torch=not a.no_torch,
        cpu_clock=a.cpu_clock,
        json_path=a.json,
        huge_pages=not a.small_pages,
        llama_cpp=a.llama_cpp,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry (``python bench/kernels.py`` / ``python -m bittern.bench_kernels``); the same options
    as ``bittern bench kernels``."""
    from .commands.bench import add_kernel_bench_arguments

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_kernel_bench_arguments(p)
    a = p.parse_args(argv)
    try:
        run_from_args(a)
    except (ValueError, UsageError) as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
