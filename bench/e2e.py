"""End-to-end CPU benchmark of the engine on random-weight models of named shapes.

For a 2B4T-shaped random ternary model it measures, per thread count: decode tok/s (128 tokens
after a 64-token prompt, greedy), prefill tok/s (128 tokens), peak resident memory, and a profile of
one decode step (ternary kernels, LM head, C glue, Python); the same shape in plain torch fp32 and
bf16 (where it fits) as a baseline; and a 70B-shaped model opened memory-mapped. Every measurement
runs in its own subprocess so peak RSS is its own. The CPU may be shared: each figure is the best of
``--repeats`` runs and ratios are taken within one run of this script. With ``--rounds N`` every engine
configuration and llama.cpp are measured N times in turn (round-robin), so each one's samples spread
over the whole run instead of one window of it; a figure is then the best over its rounds, and the
table adds the median of the per-round decode ratios to llama.cpp (each taken within one round).

    python bench/e2e.py --workdir /tmp/bm --threads 1,2 --json bench/e2e.json
    python bench/e2e.py --big /tmp/bm/70b-1.6        # also the 70B-shaped run (make it with
                                                      # `bittern model create --config 70B --random DIR`)
    python bench/e2e.py --llama-cpp 2b4t-tq2_0.gguf   # also llama.cpp on a GGUF of the same shape, same run
    python bench/e2e.py --llama-cpp 2b4t-tq2_0.gguf --rounds 3 --repeats 1   # interleaved rounds

``--llama-cpp`` times the llama.cpp inside an installed ``llama-cpp-python`` (nothing is built here). A
2B4T-shaped TQ2_0 file with llama.cpp's own Q6_K head: write a random one with
``../shared/tools/random_ternary_gguf.py OUT tq2_0`` and requantise it with
``llama_cpp.llama_model_quantize`` (ftype ``LLAMA_FTYPE_MOSTLY_TQ2_0``, ``allow_requantize``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LLAMA_CPP_REFERENCE = {  # external reference, measured earlier on this machine kind (not by this script)
    "decode_tok_s_1t": 11.6, "decode_tok_s_2t": 18.6, "prefill_tok_s_2t_pp128": 27.7,
    "note": "llama.cpp TQ2_0, 2B4T-shaped random ternary model, Q6_K head (from the project's design notes)",
}


# ----------------------------------------------------------------------------- one measurement (subprocess)


def _engine_run(spec: dict) -> dict:
    import torch

    from bittern.engine import Engine, peak_rss_bytes, set_threads

    base_rss = peak_rss_bytes()
    set_threads(spec["threads"])
    t0 = time.perf_counter()
    engine = Engine.load(spec["model"], head=spec["head"], kv_dtype=spec["kv"])
    open_s = time.perf_counter() - t0
    m = engine.model
    V = m.config.vocab_size
    g = torch.Generator().manual_seed(0)
    res: dict = {"open_s": open_s, "bytes_per_token": m.bytes_per_token, "file_bytes": m.source_bytes,
                 "fast_path": m.use_fast_path, "weights_mapped": m.weights_mapped,
                 "weights_on_huge_pages": m.weights_on_huge_pages}
    reps = spec["repeats"]
    if spec.get("prefill"):
        best = 0.0
        for _ in range(reps):
            ids = torch.randint(0, V, (spec["prefill"],), generator=g).tolist()
            cache = m.new_cache(1, spec["prefill"], spec["kv"])
            t = time.perf_counter()
            m.prefill(ids, cache)
            best = max(best, spec["prefill"] / (time.perf_counter() - t))
        res["prefill_tok_s"] = best
    from bittern.sampling import SamplingParams

    best = best_cpu = 0.0
    for _ in range(reps):
        ids = torch.randint(0, V, (spec["prompt"],), generator=g).tolist()
        n = 0
        t = c = None
        for _tok in engine.generate_ids(ids, SamplingParams(max_tokens=spec["gen"] + 1), eos_ids=set()):
            if t is None:
                t, c = time.perf_counter(), time.thread_time()  # from the first sampled token: decode steps only
            else:
                n += 1
        best = max(best, n / (time.perf_counter() - t))
        best_cpu = max(best_cpu, n / max(time.thread_time() - c, 1e-9))
    res["decode_tok_s"] = best
    if spec["threads"] == 1:  # CPU time of the only working thread: what this run would do on an idle core
        res["decode_tok_s_cpu_time"] = best_cpu
    if spec.get("profile") and m.use_fast_path:
        one = spec["threads"] == 1
        with torch.inference_mode():
            res["profile"] = _profile(m, spec["kv"], spec["prompt"], clock=time.thread_time if one else time.perf_counter)
        res["profile"]["clock"] = "thread CPU time" if one else "wall"
    used = spec["prompt"] + spec["gen"]  # positions written (the cache is sized to the context but maps lazily)
    res["kv_bytes"] = engine._cache.bytes_per_token() * used if engine._cache is not None else 0
    res["peak_rss"] = peak_rss_bytes()
    res["interpreter_rss"] = base_rss
    return res


def _profile(m, kv: str, prompt: int, steps: int = 16, clock=time.perf_counter) -> dict:
    """Split one decode step: ternary kernels, LM head, C glue (norms, RoPE, attention), Python.

    On one thread ``clock`` is the thread's CPU time, so time the process spends descheduled on a
    shared machine does not count against any part.
    """
    import torch

    from bittern.engine.headkernel import load_head_kernel

    cache = m.new_cache(1, prompt + 8 * steps + 8, kv)
    m.prefill(list(range(1, prompt + 1)), cache)
    pos = prompt
    m.decode([1], cache, [0], [pos])
    fb = m._fast[1]

    def timed(fn, n=steps):
        best = float("inf")
        for _ in range(5):
            t = clock()
            for _ in range(n):
                fn()
            best = min(best, (clock() - t) / n)
        return best

    def step():
        nonlocal pos
        pos += 1
        m.decode([1], cache, [0], [pos])

    total = timed(step)
    qh, ldh, sp, rsp = fb.qh_args
    qf, ldf = fb.qf_args[:2]

    def kernels():
        for L in m.layers:
            L.qkv.matmul_quantized(qh, ldh, sp, rsp, 1, fb.qkv)
            L.o.matmul_quantized(qh, ldh, sp, rsp, 1, fb.o)
            L.gate_up.matmul_quantized(qh, ldh, sp, rsp, 1, fb.gu)
            L.down.matmul_quantized(qf, ldf, sp, rsp, 1, fb.down)

    ternary = timed(kernels)
    head = timed(lambda: m.head.logits(fb.xn, fb.logits))
    C = load_head_kernel()
    cfg = m.config
    h, f = cfg.hidden_size, cfg.intermediate_size
    dt = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}[cache.k.dtype]
    plane = m.KVH * cache.max_len * m.hd * cache.k.element_size()
    splane = m.KVH * cache.max_len * 4
    scales = (lambda i: (cache.k_scale.data_ptr() + i * splane, cache.v_scale.data_ptr() + i * splane)) if cache.quantized \
        else (lambda i: (None, None))
    xp, xnp, attnp, op, gup = fb.x.data_ptr(), fb.xn.data_ptr(), fb.attn.data_ptr(), fb.o.data_ptr(), fb.gu.data_ptr()
    saved = fb.x.clone(), fb.gu.clone()

    def glue():
        for i, L in enumerate(m.layers):
            C.norm_quant(xp, None, L.attn_norm.data_ptr(), m.eps, 1, h, xnp, qh, ldh, sp, rsp)
            C.attend(fb.qkv.data_ptr(), m.H, m.KVH, m.hd, pos, m.cos.data_ptr() + pos * m.hd * 4, m.sin.data_ptr() + pos * m.hd * 4,
                     cache.k.data_ptr() + i * plane, cache.v.data_ptr() + i * plane, *scales(i), dt, cache.max_len, attnp,
                     fb.scores.data_ptr())
            C.norm_quant(attnp, None, L.attn_sub_norm.data_ptr() if L.attn_sub_norm is not None else None, m.eps, 1, h, None, qh, ldh, sp, rsp)
            C.norm_quant(xp, None, L.ffn_norm.data_ptr(), m.eps, 1, h, xnp, qh, ldh, sp, rsp)
            C.act_quant(gup, 1, f, 0 if cfg.activation == "swiglu" else 1,
                        L.ffn_sub_norm.data_ptr() if L.ffn_sub_norm is not None else None, m.eps, qf, ldf, sp, rsp)
            fb.x.copy_(saved[0])
            fb.gu.copy_(saved[1])

    glue_t = timed(glue, 4)
    python = max(total - ternary - head - glue_t, 0.0)
    return {"step_ms": total * 1e3, "ternary_ms": ternary * 1e3, "head_ms": head * 1e3, "glue_ms": glue_t * 1e3,
            "python_ms": python * 1e3, "python_frac": python / total, "outside_kernels_frac": (python + glue_t) / total}


def _llamacpp_run(spec: dict) -> dict:
    """llama.cpp (the build inside the installed llama-cpp-python) on a GGUF of the same shape: prefill of
    ``prefill`` tokens and ``gen`` single-token decode steps after a ``prompt``-token prompt, fixed token ids
    (no sampling), best of ``repeats``."""
    import llama_cpp

    from bittern.engine import peak_rss_bytes

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_ctx=max(spec["prefill"], spec["prompt"] + spec["gen"]) + 8, n_batch=max(spec["prefill"], 64),
                          verbose=False)
    res = {"open_s": time.perf_counter() - t0, "version": llama_cpp.__version__}
    best_pf = best_dec = 0.0
    for rep in range(spec["repeats"]):
        ids = [(7 * i + rep) % 1000 + 1 for i in range(max(spec["prefill"], spec["prompt"]))]
        if spec["prefill"]:
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids[: spec["prefill"]])
            best_pf = max(best_pf, spec["prefill"] / (time.perf_counter() - t))
        llm.reset()
        llm.eval(ids[: spec["prompt"]])
        t = time.perf_counter()
        for i in range(spec["gen"]):
            llm.eval([(13 * i + rep) % 1000 + 1])
        best_dec = max(best_dec, spec["gen"] / (time.perf_counter() - t))
    res.update(prefill_tok_s=best_pf, decode_tok_s=best_dec, peak_rss=peak_rss_bytes())
    return res


def _torch_run(spec: dict) -> dict:
    """The same shape as a dense torch model (fp32 or bf16) through the reference generation loop."""
    import torch

    from bittern.configs import get_config
    from bittern.engine import peak_rss_bytes
    from bittern.generate import generate_ids
    from bittern.model import Transformer
    from bittern.sampling import SamplingParams

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    cfg = get_config(spec["config"]).replace(linear="fp")
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 1 or p.numel() < 1e6 else p.uniform_(-0.03, 0.03)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
    model.rope_cos, model.rope_sin = __import__("bittern.model", fromlist=["rope_tables"]).rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.eval().requires_grad_(False)
    prompt = list(range(1, spec["prompt"] + 1))
    best = 0.0
    for _ in range(spec["repeats"]):
        t = None
        n = 0
        for _tok in generate_ids(model, prompt, SamplingParams(max_tokens=spec["gen"] + 1)):
            if t is None:
                t = time.perf_counter()
            else:
                n += 1
        best = max(best, n / (time.perf_counter() - t))
    return {"decode_tok_s": best, "peak_rss": peak_rss_bytes()}


def quality(model_dir: str, text_chars: int = 40_000, window: int | None = None) -> dict:
    """Perplexity of real text (held-out tail of the embedded Shakespeare) per head and KV-cache format."""
    from bittern.demo import demo_text
    from bittern.engine import Engine

    text = demo_text()
    text = text[-text_chars:]
    out: dict = {"model": model_dir, "text": f"last {text_chars} chars of bittern/data/shakespeare.txt", "head": {}, "kv": {}}
    base = Engine.load(model_dir, head="f32", kv_dtype="f32")
    ids = base.encode(text)
    out["tokens"] = len(ids)
    for head in ("f32", "bf16", "int8", "int6", "int5"):
        e = base if head == "f32" else Engine.load(model_dir, head=head, kv_dtype="f32")
        out["head"][head] = {"ppl": e.perplexity(ids, window), "head_bytes": e.model.head.nbytes}
    for kv in ("f16", "bf16", "int8"):
        e = Engine(base.model, base.tokenizer, kv_dtype=kv)
        out["kv"][kv] = {"ppl": e.perplexity(ids, window)}
    ref = out["head"]["f32"]["ppl"]
    for group in ("head", "kv"):
        for v in out[group].values():
            v["vs_f32"] = v["ppl"] / ref - 1.0
    return out


def width_step_factor(width: int, target_width: int = 2560, rows: int = 4096) -> float:
    """How much larger a per-row absmax step is, relative to the rows' spread, at ``target_width`` columns
    than at ``width`` (Gaussian rows, seeded): the mean row absmax of one over the other."""
    import torch

    g = torch.Generator().manual_seed(0)

    def mean_absmax(w: int) -> float:
        return float(torch.randn(rows, w, generator=g).abs().amax(dim=1).mean())

    return mean_absmax(target_width) / mean_absmax(width)


def offset_grid_quantize(w: "torch.Tensor", qmax: int, step_scale: float, offsets: "torch.Tensor") -> "torch.Tensor":
    """Per-row absmax quantisation of ``w`` [rows, cols] with codes in [-qmax, qmax] and the step times
    ``step_scale``, on a grid shifted by ``offsets`` [rows, 1] (in steps, each in [-0.5, 0.5)); returns
    the dequantised matrix. Offset 0 and scale 1 is the engine's quantiser."""
    import torch

    s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) * step_scale / qmax
    return (torch.round(w / s + offsets) - offsets).clamp(-qmax - 0.5, qmax + 0.5) * s


def head_grid_cost(model_dir: str, text_chars: int = 40_000, draws: int = 8, target_width: int = 2560,
                   window: int | None = None) -> dict:
    """Expected perplexity cost of the int6 / int5 LM head vs bf16, over ``draws`` random grid offsets per row
    (one grid's cost swings by about as much as the 0.5% budget on a small model), at this model's step
    and at the relatively larger step of ``target_width``-wide rows (the head is fake-quantised in f32;
    a tied embedding shares it, as in the engine)."""
    import torch

    from bittern.demo import demo_text
    from bittern.engine import Engine

    base = Engine.load(model_dir, head="f32", kv_dtype="f32")
    ids = base.encode(demo_text()[-text_chars:])
    table = base.model.head.weight
    original = table.clone()

    def ppl_with(w: "torch.Tensor") -> float:
        table.copy_(w)
        try:
            return base.perplexity(ids, window)
        finally:
            table.copy_(original)

    ref = ppl_with(original.to(torch.bfloat16).float())
    factor = width_step_factor(original.shape[1], target_width)
    g = torch.Generator().manual_seed(1)
    out: dict = {"tokens": len(ids), "bf16_ppl": ref, "draws": draws, "width": original.shape[1],
                 "target_width": target_width, "target_step_factor": factor, "formats": {}}
    for fmt, qmax in (("int6", 31), ("int5", 15)):
        for label, scale in (("this model", 1.0), (f"{target_width}-wide rows", factor)):
            costs = []
            for _ in range(draws):
                offsets = torch.rand(original.shape[0], 1, generator=g) - 0.5
                costs.append(ppl_with(offset_grid_quantize(original, qmax, scale, offsets)) / ref - 1.0)
            out["formats"].setdefault(fmt, {})[label] = {
                "mean": statistics.mean(costs), "sd": statistics.stdev(costs) if len(costs) > 1 else 0.0,
                "min": min(costs), "max": max(costs)}
    return out


def _sub(kind: str, spec: dict, timeout: float = 3600) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps({"kind": kind, **spec})]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- driver


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="/tmp/bittern-bench", help="where random models are created")
    ap.add_argument("--config", default="2B4T")
    ap.add_argument("--layouts", default="1.67bit-lut", help="comma-separated packed layouts to measure")
    ap.add_argument("--heads", default="auto", help="comma-separated LM-head formats to measure (auto = int6 at 2B4T)")
    ap.add_argument("--kv", default="f16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="measure every engine configuration and llama.cpp this many "
                    "times in turn (best per configuration; per-round ratios to llama.cpp in the JSON)")
    ap.add_argument("--torch", default="fp32,bf16", help="torch baselines to run ('' for none)")
    ap.add_argument("--torch-gen", type=int, default=8, help="tokens for the (slow) torch baselines")
    ap.add_argument("--big", action="append", default=[], help="a big model directory (70B / 100B shape) to open and run")
    ap.add_argument("--big-gen", type=int, default=8)
    ap.add_argument("--llama-cpp", default="", help="a GGUF of the same shape (e.g. TQ2_0 with llama.cpp's Q6_K head) to time "
                    "with llama-cpp-python's llama.cpp in the same run, if that package is installed")
    ap.add_argument("--quality", help="only measure perplexity per head / KV format on this trained model directory, and "
                    "the int6 / int5 heads' expected cost over random grid offsets")
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args()
    if args.one:
        spec = json.loads(args.one)
        fn = {"engine": _engine_run, "torch": _torch_run, "llamacpp": _llamacpp_run}[spec.pop("kind")]
        print(json.dumps(fn(spec)))
        return 0

    if args.quality:
        q = quality(args.quality)
        q["head_grid"] = head_grid_cost(args.quality)
        print(json.dumps(q, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(q, indent=2))
        return 0

    from bittern.configs import get_config
    from bittern.engine.create import create_random_model

    work = Path(args.workdir)
    results: dict = {"config": args.config, "llama_cpp_reference": LLAMA_CPP_REFERENCE, "engine": [], "torch": [], "big": [],
                     "llama_cpp": [], "load_avg_start": os.getloadavg()}
    threads = [int(t) for t in args.threads.split(",") if t]
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    engine_specs = []
    for layout in args.layouts.split(","):
        d = work / f"{args.config}-{layout}"
        if not (d / "config.json").is_file():
            print(f"creating {d} ...", file=sys.stderr)
            create_random_model(d, get_config(args.config), layout=layout)
        for head in args.heads.split(","):
            for th in threads:
                engine_specs.append(({"model": str(d), "threads": th, "head": head, "kv": args.kv, "prompt": args.prompt,
                                      "gen": args.gen, "prefill": args.prefill, "repeats": args.repeats, "profile": True},
                                     {"layout": layout, "head": head, "threads": th}))
    lcpp_specs = [({"gguf": args.llama_cpp, "threads": th, "prompt": args.prompt, "gen": args.gen, "prefill": args.prefill,
                    "repeats": args.repeats}, {"gguf": args.llama_cpp, "threads": th}) for th in threads] if args.llama_cpp else []
    engine_rounds: list[list[dict]] = [[] for _ in engine_specs]
    lcpp_rounds: list[list[dict]] = [[] for _ in lcpp_specs]
    for rnd in range(args.rounds):
        for specs, store, kind in ((engine_specs, engine_rounds, "engine"), (lcpp_specs, lcpp_rounds, "llamacpp")):
            for (spec, tags), runs in zip(specs, store):
                r = _sub(kind, spec)
                r.update(tags, round=rnd)
                runs.append(r)
                print(json.dumps(r), file=sys.stderr)
    results["rounds"] = args.rounds
    results["llama_cpp"] = [merge_rounds(runs) for runs in lcpp_rounds]
    lcpp_round_by = {runs[0]["threads"]: runs for runs in lcpp_rounds}
    for runs in engine_rounds:
        r = merge_rounds(runs)
        paired = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs, lcpp_round_by.get(r["threads"], []))
                  if a.get("decode_tok_s") and b.get("decode_tok_s")]
        if paired:
            r["decode_vs_llama_cpp_rounds"] = paired
        results["engine"].append(r)
    for dt in [t for t in args.torch.split(",") if t]:
        for th in threads:
            r = _sub("torch", {"config": args.config, "dtype": dt, "threads": th, "prompt": args.prompt,
                               "gen": args.torch_gen, "repeats": 1})
            r.update(dtype=dt, threads=th)
            results["torch"].append(r)
            print(json.dumps(r), file=sys.stderr)
    for big in args.big:
        spec = {"model": big, "threads": max(threads), "head": "int8", "kv": args.kv, "prompt": 16, "gen": args.big_gen,
                "prefill": 0, "repeats": 1, "profile": False}
        r = _sub("engine", spec)
        r.update(model=big, threads=max(threads))
        results["big"].append(r)
        print(json.dumps(r), file=sys.stderr)
    results["load_avg_end"] = os.getloadavg()
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def merge_rounds(runs: list[dict]) -> dict:
    """One configuration's rounds as one result: the round with the best decode rate, with the best prefill
    rate and the largest peak RSS over all rounds, and every round's rates under ``"rounds"``."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    best = dict(max(ok, key=lambda r: r.get("decode_tok_s", 0.0)))
    if any("prefill_tok_s" in r for r in ok):
        best["prefill_tok_s"] = max(r.get("prefill_tok_s", 0.0) for r in ok)
    best["peak_rss"] = max(r.get("peak_rss", 0) for r in ok)
    best["rounds"] = [{k: r.get(k) for k in ("decode_tok_s", "prefill_tok_s")} | ({"error": r["error"]} if "error" in r else {})
                      for r in runs]
    best.pop("round", None)
    return best


def format_table(results: dict) -> str:
    """A Markdown table of the results, with ratios to llama.cpp and the torch baselines of the same run."""
    torch_by = {(r["dtype"], r["threads"]): r.get("decode_tok_s") for r in results["torch"]}
    lcpp_by = {r["threads"]: r for r in results.get("llama_cpp", []) if "error" not in r}

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    def paired(r: dict) -> str:
        ratios = r.get("decode_vs_llama_cpp_rounds", [])
        return f" (median of rounds {statistics.median(ratios):.2f}x)" if len(ratios) > 1 else ""

    lines = ["| run | threads | decode tok/s | prefill tok/s | decode vs llama.cpp | prefill vs llama.cpp | vs torch fp32 | "
             "vs torch bf16 | peak RSS (GB) | file + KV (GB) | outside kernels |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["engine"]:
        name = f"{r['layout']} / head {r['head']}"
        if "error" in r:
            lines.append(f"| {name} | {r['threads']} | error: {r['error']} |||||||||")
            continue
        dec, pf, th = r["decode_tok_s"], r.get("prefill_tok_s", 0.0), r["threads"]
        lc = lcpp_by.get(th, {})
        prof = r.get("profile", {})
        lines.append(f"| {name} | {th} | {dec:.2f} | {pf:.2f} | {ratio(dec, lc.get('decode_tok_s'))}{paired(r)} | "
                     f"{ratio(pf, lc.get('prefill_tok_s'))} | {ratio(dec, torch_by.get(('fp32', th)))} | "
                     f"{ratio(dec, torch_by.get(('bf16', th)))} | {r['peak_rss'] / 1e9:.2f} | "
                     f"{(r['file_bytes'] + r['kv_bytes']) / 1e9:.2f} | "
                     f"{100 * prof.get('outside_kernels_frac', float('nan')):.1f}% |")
    for r in results.get("llama_cpp", []):
        if "error" in r:
            lines.append(f"| llama.cpp {Path(r['gguf']).name} | {r['threads']} | error: {r['error']} |||||||||")
            continue
        lines.append(f"| llama.cpp {r.get('version', '')} ({Path(r['gguf']).name}) | {r['threads']} | {r['decode_tok_s']:.2f} | "
                     f"{r['prefill_tok_s']:.2f} | | | | | {r['peak_rss'] / 1e9:.2f} | | |")
    for r in results["torch"]:
        lines.append(f"| torch {r['dtype']} (dense) | {r['threads']} | {r.get('decode_tok_s', float('nan')):.2f} | | | | | | "
                     f"{r.get('peak_rss', 0) / 1e9:.2f} | | |")
    for r in results["big"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['threads']} | error: {r['error']} |||||||||")
            continue
        lines.append(f"| {Path(r['model']).name} (opened in {r['open_s']:.1f} s) | {r['threads']} | {r['decode_tok_s']:.3f} | "
                     f"| | | | | {r['peak_rss'] / 1e9:.2f} | {(r['file_bytes'] + r['kv_bytes']) / 1e9:.2f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
