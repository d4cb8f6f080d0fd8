#!/usr/bin/env python
"""Check and time bittern's Triton (GPU) kernels in one run: correctness first, then speed.

    python bench/gpu.py [--json out.json] [--quick] [--skip gemv gemm e2e train sweep]

Needs a CUDA device (it says so and exits with status 2 otherwise). In order, it

1. checks every kernel on the device against the reference (bit-exact for GEMV/GEMM, including
   round-half-even ties; tolerance for the fused training BitLinear against the unfused autograd);
2. measures the device's copy bandwidth (device-to-device copy of 1 GiB, read + write bytes);
3. times W2A8 GEMV (M=1) and GEMM (M=512) against ``torch`` bf16 ``F.linear`` at the layer shapes
   of 2B4T, 3B, 7B and 70B (CUDA-graph timing; weights rotate through >= 256 MiB of copies so they
   come from HBM, not L2), reporting achieved GB/s against the copy bandwidth, plus a sweep of
   kernel block sizes to retune the defaults in ``bittern/kernels/triton_kernels.py``;
4. decodes with a 2B4T-shaped model (random weights, ``Transformer(get_config('2B4T')).freeze()``)
   against the same model in bf16 PyTorch, both through :class:`bittern.gpu.StaticDecoder` and
   :func:`bittern.gpu.cuda_graph_decode` (and eagerly), with peak GPU memory;
5. times a training step (AdamW, bf16 autocast) of a ~100M model: BitNet with the fused Triton
   BitLinear, BitNet unfused, and the FP (bf16) baseline.

Targets on an H100: GEMV >= 4x bf16 at 2B4T shapes, end-to-end decode >= 3x bf16, BitNet training
step <= 1.15x bf16. ``--cpu-smoke`` runs the same code paths on tiny shapes on the CPU under the
Triton interpreter (timings meaningless, no CUDA graphs): a check of this script, not of speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Callable

MiB = 1 << 20

SHAPES = {  # (name, out N, in K) of one block's distinct linear layers
    "2B4T": [("q/o", 2560, 2560), ("k/v", 640, 2560), ("gate/up", 6912, 2560), ("down", 2560, 6912)],
    "3B": [("qkvo", 3200, 3200), ("gate/up", 8640, 3200), ("down", 3200, 8640)],
    "7B": [("qkvo", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "70B": [("q/o", 8192, 8192), ("k/v", 1024, 8192), ("gate/up", 28672, 8192), ("down", 8192, 28672)],
}
SMOKE_SHAPES = {"tiny": [("a", 37, 100), ("b", 64, 48)]}
GEMV_SWEEP = [  # BLOCK_P <= 16 * num_warps: no shared-memory shuffle in the loop (see triton_kernels)
    {"BLOCK_N": bn, "BLOCK_P": bp, "num_warps": nw}
    for bn, bp, nw in ((16, 64, 4), (32, 64, 4), (8, 64, 4), (16, 32, 4), (32, 32, 4), (64, 32, 4),
                       (16, 128, 8), (32, 128, 8), (64, 64, 8), (8, 128, 8), (16, 32, 2), (32, 32, 2))
]
GEMM_SWEEP = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
]


def log(msg: str) -> None:
    print(msg, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.torch = torch
        self.smoke = args.cpu_smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.results: dict[str, Any] = {"ok": True, "checks": [], "notes": []}

    # ------------------------------------------------------------------ timing helpers

    def time_ms(self, fn: Callable[[], Any], rep_ms: int = 50) -> float:
        """Mean milliseconds per call (CUDA-graph replay on GPU; wall clock in smoke mode)."""
        if self.smoke:
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        import triton.testing

        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms))

    def rotating(self, make: Callable[[], Any], nbytes: int) -> list[Any]:
        """Enough copies of an operand that cycling through them overflows the L2 cache."""
        n = 1 if self.smoke else max(1, min(256, math.ceil(256 * MiB / max(nbytes, 1))))
        return [make() for _ in range(n)]

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.results["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        if not ok:
            self.results["ok"] = False
        log(f"  [{'ok' if ok else 'FAIL'}] {name} {detail}")

    # ------------------------------------------------------------------ 0. device

    def device_info(self) -> None:
        torch = self.torch
        import triton

        info = {"torch": torch.__version__, "triton": triton.__version__, "device": str(self.device)}
        if not self.smoke:
            p = torch.cuda.get_device_properties(0)
            info.update(name=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                        capability=f"{p.major}.{p.minor}")
        self.results["device"] = info
        log(f"device: {info}")

    def copy_bandwidth(self) -> None:
        torch = self.torch
        n = (1 << 30) if not self.smoke else 8 * MiB
        src = torch.empty(n, dtype=torch.uint8, device=self.device)
        src.random_(0, 255)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src), rep_ms=200)
        gbs = 2 * n / ms / 1e6
        self.results["copy_GBps"] = gbs
        log(f"device-to-device copy: {gbs:.0f} GB/s (read + write of {n / 2**30:.2f} GiB)")
        del src, dst

    # ------------------------------------------------------------------ 1. correctness

    def correctness(self) -> None:
        torch = self.torch
        from bittern.kernels.reference import ReferenceBackend
        from bittern.kernels.triton_backend import BACKEND
        from bittern.pack import TernaryWeight

        log("correctness (device vs reference on CPU):")
        ref = ReferenceBackend()
        gen = torch.Generator().manual_seed(0)
        cases = [(1, 37, 100), (3, 70, 300), (4, 1, 17), (19, 130, 45), (64, 96, 200), (5, 2560, 2560),
                 (1, 6912, 2560), (1, 2560, 6912), (7, 640, 2560)]
        if self.smoke:
            cases = cases[:5]
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for m, n, k in cases:
                codes = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
                codes[0, 0] = 1
                w_cpu = TernaryWeight.from_codes(codes, torch.rand((), generator=gen) * 0.1 + 1e-3, "2bit")
                w_dev = BACKEND.prepare(TernaryWeight(w_cpu.packed.to(self.device), w_cpu.scale.to(self.device),
                                                      n, k, "2bit"))
                x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
                want = ref.linear(x, w_cpu)
                got = BACKEND.linear(x.to(self.device), w_dev).cpu()
                self.check(f"linear M={m} N={n} K={k} {str(dtype)[6:]}", torch.equal(got, want),
                           "" if torch.equal(got, want) else f"max |diff| {float((got - want).abs().max()):.3g}")
        # round half to even: rows with absmax 127 (s == 1) and 254 (s == 0.5) put x * s on ties
        vals = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 126.5, -126.5, 4.5])
        x = vals.repeat(8, 4)
        x[1::2] *= 2
        codes = torch.randint(-1, 2, (33, x.shape[1]), generator=gen, dtype=torch.int8)
        w_cpu = TernaryWeight.from_codes(codes, 0.05, "2bit")
        w_dev = BACKEND.prepare(TernaryWeight(w_cpu.packed.to(self.device), w_cpu.scale.to(self.device),
                                              33, x.shape[1], "2bit"))
        for rows in (1, 3, 8):
            got = BACKEND.linear(x[:rows].to(self.device), w_dev).cpu()
            self.check(f"round-half-even ties M={rows}", torch.equal(got, ref.linear(x[:rows], w_cpu)))
        self.correctness_training()

    def correctness_training(self) -> None:
        torch = self.torch
        from bittern.layers import BitLinear
        from bittern.quant import ste_activation, ste_weight

        if self.smoke:
            from bittern.kernels.triton_backend import fused_bitlinear as fused
        else:
            fused = None  # BitLinear.forward takes the fused path itself on CUDA

        def unfused(layer, x):
            h = layer.norm(x) if layer.norm is not None else x
            return torch.nn.functional.linear(ste_activation(h), ste_weight(layer.weight).to(h.dtype))

        def run(layer, x, gy, use_fused):
            x = x.detach().requires_grad_(True)
            layer.zero_grad()
            if use_fused:
                y = fused(x, layer.norm.weight if layer.norm is not None else None, layer.weight,
                          layer.norm.eps if layer.norm is not None else 0.0) if fused else layer(x)
            else:
                y = unfused(layer, x)
            y.backward(gy)
            out = [y.detach(), x.grad, layer.weight.grad]
            if layer.norm is not None:
                out.append(layer.norm.weight.grad)
            return [t.detach().float().clone() for t in out]

        torch.manual_seed(0)
        for norm in (True, False):
            for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, 3e-2)):  # RMSNorm rsqrt flips a few q
                for shape in ((4, 33, 200), (300, 768)):
                    layer = BitLinear(shape[-1], 130, norm=norm).to(self.device)
                    x = torch.randn(*shape, device=self.device).to(dtype)
                    gy = torch.randn(*shape[:-1], 130, device=self.device).to(dtype)
                    a, b = run(layer, x, gy, True), run(layer, x, gy, False)
                    errs = [float((p - q).abs().max() / q.abs().max().clamp(min=1e-6)) for p, q in zip(a, b)]
                    self.check(f"fused BitLinear norm={norm} {str(dtype)[6:]} x{shape}", max(errs) <= tol,
                               "rel err y/dx/dW/dnw " + " ".join(f"{e:.1e}" for e in errs))

    # ------------------------------------------------------------------ 2. kernels

    def kernels(self, m: int, label: str) -> None:
        torch = self.torch
        import torch.nn.functional as F

        from bittern.kernels.triton_backend import BACKEND
        from bittern.pack import TernaryWeight

        copy = self.results["copy_GBps"]
        rows = []
        log(f"{label}: M={m}, W2A8 Triton vs torch bf16 F.linear")
        log(f"  {'model':6} {'layer':8} {'N':>6} {'K':>6} | {'ours us':>8} {'GB/s':>6} {'%copy':>5} | "
            f"{'bf16 us':>8} {'GB/s':>6} {'%copy':>5} | {'speedup':>7}")
        shapes = SMOKE_SHAPES if self.smoke else SHAPES
        for model, layers in shapes.items():
            if self.args.quick and model in ("3B", "70B"):
                continue
            for name, n, k in layers:
                x = torch.randn(m, k, device=self.device, dtype=torch.bfloat16)

                def make_w():
                    codes = torch.randint(-1, 2, (n, k), device=self.device, dtype=torch.int8)
                    return TernaryWeight.from_codes(codes, 0.02, "2bit-k64")

                wq = self.rotating(make_w, n * k // 4)
                wb = self.rotating(lambda: torch.randn(n, k, device=self.device, dtype=torch.bfloat16), 2 * n * k)
                it_q, it_b = iter(range(1 << 60)), iter(range(1 << 60))
                t_q = self.time_ms(lambda: BACKEND.linear(x, wq[next(it_q) % len(wq)]), rep_ms=20)
                t_b = self.time_ms(lambda: F.linear(x, wb[next(it_b) % len(wb)]), rep_ms=20)
                io = m * k * 2 + m * n * 4
                gq = (wq[0].packed.numel() + io) / t_q / 1e6
                gb = (2 * n * k + io) / t_b / 1e6
                row = {"model": model, "layer": name, "N": n, "K": k, "M": m, "ours_us": t_q * 1e3,
                       "ours_GBps": gq, "bf16_us": t_b * 1e3, "bf16_GBps": gb, "speedup": t_b / t_q}
                if not self.args.quick and "sweep" not in self.args.skip:
                    row["sweep"] = self.sweep(m, x, wq, k)
                rows.append(row)
                best = f"   best sweep {row['sweep']['best_us']:.1f} us {row['sweep']['best']}" if "sweep" in row else ""
                log(f"  {model:6} {name:8} {n:6d} {k:6d} | {t_q * 1e3:8.1f} {gq:6.0f} {100 * gq / copy:5.0f} | "
                    f"{t_b * 1e3:8.1f} {gb:6.0f} {100 * gb / copy:5.0f} | {t_b / t_q:6.2f}x{best}")
                del wq, wb
        self.results[label] = rows

    def sweep(self, m: int, x, wq: list, k: int) -> dict:
        from bittern.kernels import triton_kernels as kern
        from bittern.kernels.triton_backend import weight_words

        words = [weight_words(w) for w in wq]
        gamma = wq[0].scale.reshape(1).float()
        x2 = x.contiguous()
        best, best_t, results = None, float("inf"), []
        configs = GEMV_SWEEP if m <= kern.GEMV_MAX_M else GEMM_SWEEP
        if self.smoke:
            configs = configs[:2]
        for cfg in configs:
            fn = kern.gemv if m <= kern.GEMV_MAX_M else kern.gemm
            it = iter(range(1 << 60))
            try:
                t = self.time_ms(lambda: fn(x2, words[next(it) % len(words)], gamma, k, config=dict(cfg)), rep_ms=20)
            except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
                results.append({"config": cfg, "error": type(e).__name__})
                continue
            results.append({"config": cfg, "us": t * 1e3})
            if t < best_t:
                best, best_t = cfg, t
        return {"best": best, "best_us": best_t * 1e3, "all": results}

    # ------------------------------------------------------------------ 3. end-to-end decode

    def e2e(self) -> None:
        torch = self.torch
        from bittern.configs import get_config
        from bittern.gpu import StaticDecoder, cuda_graph_decode
        from bittern.model import Transformer

        cfg = get_config("tiny-2b4t" if self.smoke else "2B4T")
        prompt_len, new = (8, 4) if self.smoke else (32, 128 if not self.args.quick else 64)
        max_len = 256 if not self.smoke else 16
        out = {"config": cfg.name, "prompt": prompt_len, "new_tokens": new, "max_len": max_len}
        log(f"end-to-end decode, {cfg.name} shape, random weights, batch 1, prompt {prompt_len}, {new} new tokens:")
        prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=self.device)
        for kind in ("bitnet", "bf16"):
            torch.manual_seed(0)
            with torch.device(self.device):
                model = Transformer(cfg if kind == "bitnet" else cfg.replace(linear="fp"))
            if kind == "bitnet":
                model.freeze(layout="2bit-k64")
            for p in model.parameters():  # float parameters to bf16; packed codes and scales untouched
                p.data = p.data.to(torch.bfloat16)
            model.eval()
            if not self.smoke:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            dec = StaticDecoder(model, 1, max_len, dtype=torch.bfloat16)
            logits = dec.prefill(prompt)
            tok = logits.argmax(-1, keepdim=True)
            pos = torch.tensor(prompt_len, device=self.device)
            res = {}
            for mode in ("eager", "graph"):
                if mode == "graph" and self.smoke:
                    continue
                step = dec.step if mode == "eager" else cuda_graph_decode(dec.step, tok, pos)
                n = new if mode == "graph" else min(new, 32)
                p, t_ = pos.clone(), tok.clone()
                self.sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    t_ = step(t_, p).argmax(-1, keepdim=True)
                    p += 1
                self.sync()
                res[f"{mode}_tok_s"] = n / (time.perf_counter() - t0)
            if not self.smoke:
                res["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            res["weights_GiB"] = (sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype == torch.uint8)
                                  + sum(p.numel() * p.element_size() for p in model.parameters())) / 2**30
            out[kind] = res
            log(f"  {kind:6}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
            del model, dec, logits
            if not self.smoke:
                torch.cuda.empty_cache()
        key = "graph_tok_s" if not self.smoke else "eager_tok_s"
        out["speedup"] = out["bitnet"][key] / out["bf16"][key]
        log(f"  decode speedup BitNet / bf16 ({key}): {out['speedup']:.2f}x (target >= 3x on H100)")
        self.results["e2e_decode"] = out

    # ------------------------------------------------------------------ 4. training

    def training(self) -> None:
        torch = self.torch
        import torch.nn.functional as F

        import bittern.layers as layers
        from bittern.configs import ModelConfig
        from bittern.model import Transformer

        if self.smoke:
            cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160,
                              max_seq_len=64, name="smoke")
            batch, seq, steps = 2, 32, 2
        else:
            cfg = ModelConfig(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048,
                              max_seq_len=1024, name="~100M")
            batch, seq, steps = 8, 1024, 10 if not self.args.quick else 5
        out = {"config": cfg.to_dict(), "batch": batch, "seq": seq, "params_M": cfg.num_params() / 1e6}
        log(f"training step, {cfg.num_params() / 1e6:.0f}M params, batch {batch} x {seq}, AdamW, bf16 autocast:")
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=self.device)
        original = layers._fused_training_forward
        for kind in ("fp", "bitnet-fused", "bitnet-unfused"):
            torch.manual_seed(0)
            model = Transformer(cfg.replace(linear="fp" if kind == "fp" else "bitnet")).to(self.device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not self.smoke)
            if kind == "bitnet-unfused":
                layers._fused_training_forward = lambda: None
            try:
                def step():
                    with torch.autocast(self.device.type, dtype=torch.bfloat16):
                        logits = model(tokens[:, :-1])
                        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss

                for _ in range(2 if self.smoke else 3):
                    step()
                self.sync()
                if not self.smoke:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(steps):
                    loss = step()
                self.sync()
                ms = (time.perf_counter() - t0) / steps * 1e3
            finally:
                layers._fused_training_forward = original
            res = {"step_ms": ms, "loss": float(loss.detach())}
            if not self.smoke:
                res["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            out[kind] = res
            log(f"  {kind:15}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
            del model, opt
        out["ratio_fused"] = out["bitnet-fused"]["step_ms"] / out["fp"]["step_ms"]
        out["ratio_unfused"] = out["bitnet-unfused"]["step_ms"] / out["fp"]["step_ms"]
        log(f"  BitNet / bf16 step time: fused {out['ratio_fused']:.2f}x, unfused {out['ratio_unfused']:.2f}x "
            f"(target <= 1.15x on H100)")
        self.results["training"] = out

    def sync(self) -> None:
        if not self.smoke:
            self.torch.cuda.synchronize()

    # ------------------------------------------------------------------ summary

    def summary(self) -> None:
        r = self.results
        targets = {}
        gemv = [row for row in r.get("gemv", []) if row["model"] == "2B4T"]
        if gemv:
            targets["gemv_2B4T_min_speedup"] = {"value": min(x["speedup"] for x in gemv), "target": ">= 4"}
        if "e2e_decode" in r:
            targets["e2e_decode_speedup"] = {"value": r["e2e_decode"]["speedup"], "target": ">= 3"}
        if "training" in r:
            targets["train_step_ratio"] = {"value": r["training"]["ratio_fused"], "target": "<= 1.15"}
        for t in targets.values():
            v, goal = t["value"], t["target"]
            t["met"] = v >= float(goal[3:]) if goal.startswith(">=") else v <= float(goal[3:])
        r["targets"] = targets
        log("summary:")
        log(f"  correctness: {'all checks passed' if r['ok'] else 'FAILURES (see above)'}")
        for name, t in targets.items():
            log(f"  {name:24} {t['value']:7.2f}  target {t['target']:8} {'met' if t['met'] else 'NOT met'}")
        if self.smoke:
            log("  (--cpu-smoke: interpreter on CPU, tiny shapes; these numbers mean nothing)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and steps, no block-size sweep")
    ap.add_argument("--skip", nargs="*", default=[], choices=["check", "gemv", "gemm", "e2e", "train", "sweep"],
                    help="parts to leave out")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run this script's code paths on CPU under the Triton interpreter (tiny shapes)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device is available (torch.cuda.is_available() is False), so there is "
              "nothing to measure; run it on a machine with an NVIDIA GPU (or use --cpu-smoke to check the "
              "script itself). Nothing was run.", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench/gpu.py: the 'triton' package is not installed (pip install triton). Nothing was run.",
              file=sys.stderr)
        return 2
    bench = Bench(args)
    t0 = time.perf_counter()
    bench.device_info()
    bench.copy_bandwidth()
    if "check" not in args.skip:
        bench.correctness()
    if "gemv" not in args.skip:
        bench.kernels(1, "gemv")
    if "gemm" not in args.skip:
        bench.kernels(512 if not args.cpu_smoke else 9, "gemm")
    if "e2e" not in args.skip:
        bench.e2e()
    if "train" not in args.skip:
        bench.training()
    bench.results["seconds"] = time.perf_counter() - t0
    bench.summary()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(bench.results, f, indent=2, default=str)
        log(f"wrote {args.json}")
    return 0 if bench.results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
