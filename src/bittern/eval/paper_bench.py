"""The BitNet b1.58 paper's cost comparison, measured on this machine.

For each named config (:data:`bittern.configs.CONFIGS`) a BitNet b1.58 model with random ternary
weights and an FP LLaMA of the same shape with random weights (PyTorch, ``fp_dtype``; bfloat16 by
default because CPU PyTorch runs float16 matrix products far slower) are built and measured, each
in a fresh subprocess so that peak resident memory belongs to one model:

* weight memory: bytes of every parameter and buffer the model holds (BitNet: packed 2-bit codes
  and scales, embeddings, norms and LM head in ``fp_dtype``), and the same figure computed from the
  shapes for the whole model;
* peak resident memory: the subprocess's peak RSS while prefilling and decoding at batch 1 (the
  kernel's counter is reset after the build, so build-time scratch does not count), minus the RSS
  after imports (the Python and PyTorch runtime);
* decode latency: median wall time of one token with a KV cache, after a short prompt;
* throughput: tokens per second of batched decode steps at the largest batch whose weights, KV cache
  and logits fit ``budget`` bytes (default: 1.15x the FP16 weights of the config, the headroom of
  the paper's 70B run on two 80 GB A100s), capped at ``max_batch``;
* arithmetic energy per token from :mod:`bittern.eval.energy` (7nm and 45nm).

The BitNet side runs on the fastest path available: the engine (:mod:`bittern.engine`) when it
imports and runs, else the frozen :class:`~bittern.model.Transformer` through the kernel seam
(:func:`bittern.kernels.get_backend`, "native" when built). Which one ran is recorded.

Configs whose FP weights exceed ``full_limit`` bytes are measured on ``scaled_layers`` blocks plus
embeddings and head, and scaled to full depth: ``t = t_head + depth / k * (t_k - t_head)``; such rows
are labelled ``"scaled"`` and their memory figures are computed from the shapes, not measured.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configs import ModelConfig, get_config
from ..errors import UsageError
from .energy import energy_per_token

#: The paper's FP16-LLaMA / BitNet-b1.58 ratios (arXiv 2402.17764: Table 1 for 700M-3.9B, Figure 2
#: for 7B-70B, Table 3 for 70B throughput). Latency and memory are on GPU with FasterTransformer and
#: a 2-bit Ladder kernel.
PAPER_RATIOS: dict[str, dict[str, float]] = {
    "700M": {"memory": 2.60, "latency": 1.23},
    "1.3B": {"memory": 2.93, "latency": 1.67},
    "3B": {"memory": 3.55, "latency": 2.71},
    "3.9B": {"memory": 3.32, "latency": 2.40},
    "7B": {"memory": 4.40, "latency": 2.90},
    "13B": {"memory": 5.12, "latency": 3.68},
    "70B": {"memory": 7.16, "latency": 4.10, "throughput": 8.9},
}

DEFAULT_CONFIGS = ("700M", "1.3B", "3B", "70B")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# the 81 bytes whose four 2-bit fields are all valid stored codes (0, 1, 2 = code -1, 0, +1)
_VALID_2BIT = torch.tensor([a | (b << 2) | (c << 4) | (d << 6) for a in range(3) for b in range(3)
                            for c in range(3) for d in range(3)], dtype=torch.uint8)


@dataclass
class BenchSettings:
    """Knobs of one paper-bench run."""

    fp_dtype: str = "bfloat16"
    prompt_len: int = 32
    decode_steps: int = 6
    throughput_ctx: int = 128
    throughput_steps: int = 1
    budget: float | None = None
    max_batch: int = 32
    full_limit: float = 8e9
    scaled_layers: int = 1
    threads: int | None = None
    seed: int = 0
    timeout: float = 900.0


# ----------------------------------------------------------------------------- building models


def _tiled(shape: tuple[int, ...], block: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` filled by repeating ``block`` (every page written, so it is resident)."""
    out = torch.empty(shape, dtype=block.dtype)
    flat = out.view(-1)
    n = block.numel()
    for a in range(0, flat.numel(), n):
        b = min(a + n, flat.numel())
        flat[a:b] = block[: b - a]
    return out


def random_ternary(out_features: int, in_features: int, generator: torch.Generator | None = None,
                   layout: str = "2bit") -> Any:
    """A random ternary weight (codes uniform over {-1, 0, 1}, gamma 0.02) in ``layout``.

    A random block of up to 1 MiB of packed bytes is tiled over the matrix (cheap for 70B-sized layers).
    ``layout`` may be ``"2bit"`` or (when ``out_features`` is a multiple of 4) the native kernels'
    ``"2bit-r4"``, whose bytes also hold four 2-bit fields each: random valid bytes are then a random
    matrix in that layout, and only the last column block, which holds the padding, is packed from
    codes. No layout conversion is needed at load time. Other cases give ``"2bit"``.
    """
    from ..pack import LAYOUTS, TernaryWeight, get_layout

    if layout == "2bit-r4" and "2bit-r4" in LAYOUTS and out_features % 4 == 0:
        cols = LAYOUTS["2bit-r4"].packed_cols(in_features)
        if cols % 32 == 0 and cols * 4 >= in_features:
            idx = torch.randint(0, len(_VALID_2BIT), (min(out_features * cols, 1 << 20) + 7,), generator=generator)
            packed = _tiled((out_features, cols), _VALID_2BIT[idx])
            tail = in_features % 128
            if tail:  # the last 128-column block holds padding: write it from codes that are 0 there
                last = torch.zeros(out_features, 128, dtype=torch.int8)
                last[:, :tail] = torch.randint(-1, 2, (out_features, tail), generator=generator, dtype=torch.int8)
                nb = cols // 32
                blocks = packed.view(out_features // 4, nb, 4, 32)
                blocks[:, nb - 1] = LAYOUTS["2bit-r4"].pack(last).view(out_features // 4, 4, 32)
            return TernaryWeight(packed, torch.tensor(0.02), out_features, in_features, "2bit-r4")
    cols = get_layout("2bit").packed_cols(in_features)
    idx = torch.randint(0, len(_VALID_2BIT), (min(out_features * cols, 1 << 20) + 7,), generator=generator)
    packed = _tiled((out_features, cols), _VALID_2BIT[idx])
    if in_features % 4:  # padding fields must hold code 0 (stored 1)
        keep = in_features % 4
        last = packed[:, -1].to(torch.int16)
        mask = (1 << (2 * keep)) - 1
        pad = sum(1 << (2 * i) for i in range(keep, 4))
        packed[:, -1] = ((last & mask) | pad).to(torch.uint8)
    return TernaryWeight(packed, torch.tensor(0.02), out_features, in_features, "2bit")


def _materialise(model: torch.nn.Module, cfg: ModelConfig, dtype: torch.dtype, generator: torch.Generator) -> None:
    """Give every parameter still on the meta device random values in ``dtype``; set the RoPE tables."""
    from ..model import rope_tables

    state = {}
    for name, p in model.named_parameters():
        if p.device.type != "meta" or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        if name.endswith("norm.weight") or "layernorm" in name:
            t = torch.ones(p.shape, dtype=dtype)
        else:  # a random block of up to 4M values (an odd length, so rows differ) tiled over the tensor
            block = torch.empty(min(p.numel(), 1 << 22) + 7).uniform_(-0.03, 0.03, generator=generator).to(dtype)
            t = _tiled(tuple(p.shape), block)
        state[name] = torch.nn.Parameter(t, requires_grad=False)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.requires_grad_(False)


def random_packed_model(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                        layout: str | None = None) -> torch.nn.Module:
    """A frozen BitNet :class:`~bittern.model.Transformer` with random packed ternary codes, built without
    ever allocating float weights for its linear layers (embeddings, norms and head in ``dtype``).

    ``layout`` (default: ``"2bit-r4"`` when the native backend is the active one and every input width
    is a multiple of 128, else ``"2bit"``) is passed to :func:`random_ternary`.
    """
    from ..kernels import get_backend
    from ..layers import BitLinear, PackedLinear
    from ..model import Transformer

    if layout is None:
        layout = "2bit-r4" if get_backend(None, "cpu").name == "native" else "2bit"
    if layout == "2bit-r4" and any(o % 4 for o, _ in cfg.linear_shapes().values()):
        layout = "2bit"  # one layout for the whole model (the engine expects that)

    cfg = cfg.replace(linear="bitnet")
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BitLinear):
                weight = random_ternary(child.out_features, child.in_features, g, layout)
                setattr(module, child_name, PackedLinear(weight, child.norm))
    _materialise(model, cfg, dtype, g)
    return model.eval()


def random_fp_model(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    """An FP (``linear="fp"``) :class:`~bittern.model.Transformer` of ``cfg``'s shape with random weights in ``dtype``."""
    from ..model import Transformer

    cfg = cfg.replace(linear="fp")
    with torch.device("meta"):
        model = Transformer(cfg)
    _materialise(model, cfg, dtype, torch.Generator().manual_seed(seed))
    return model.eval()


def weight_bytes(cfg: ModelConfig, side: str, fp_bytes: int = 2) -> int:
    """Bytes of the weights of a whole model computed from its shapes (``side``: "bitnet" or "fp")."""
    other = (cfg.num_norm_params() + cfg.num_embedding_params()) * fp_bytes
    if side == "fp":
        return cfg.num_linear_params() * fp_bytes + other
    packed = cfg.num_layers * sum(o * ((i + 3) // 4) + 4 for o, i in cfg.linear_shapes().values())
    return packed + other


def kv_bytes_per_seq(cfg: ModelConfig, ctx: int, kv_bytes: int = 2) -> int:
    """KV-cache bytes of one sequence of ``ctx`` positions."""
    return cfg.num_layers * 2 * cfg.kv_dim * ctx * kv_bytes


def max_batch(cfg: ModelConfig, side: str, budget: float, ctx: int, fp_bytes: int = 2) -> int:
    """Largest batch whose weights, KV cache and float32 logits fit ``budget`` bytes (0 if none)."""
    spare = budget - weight_bytes(cfg, side, fp_bytes)
    per_seq = kv_bytes_per_seq(cfg, ctx, fp_bytes) + 2 * cfg.vocab_size * 4
    return max(0, int(spare // per_seq))


def _module_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    tensors = []
    if isinstance(model, torch.nn.Module):
        tensors = list(model.parameters()) + list(model.buffers())
    else:  # the engine: walk its attributes for tensors
        stack = [model]
        visited: set[int] = set()
        while stack:
            obj = stack.pop()
            if id(obj) in visited:
                continue
            visited.add(id(obj))
            if isinstance(obj, torch.Tensor):
                tensors.append(obj)
            elif isinstance(obj, (list, tuple)):
                stack.extend(obj)
            elif isinstance(obj, dict):
                stack.extend(obj.values())
            elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("bittern", "torch")) is True:
                stack.extend(vars(obj).values())
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


# ----------------------------------------------------------------------------- running models


class _Runner:
    """Prefill/decode on one model, hiding whether it is the engine or a Transformer."""

    def __init__(self, model: Any, cfg: ModelConfig, kv_dtype: torch.dtype, engine: bool) -> None:
        self.model, self.cfg, self.kv_dtype, self.engine = model, cfg, kv_dtype, engine

    def new_cache(self, batch: int, max_len: int) -> Any:
        if self.engine:
            return self.model.new_cache(slots=batch, max_len=max_len)
        from ..model import KVCache

        return KVCache(self.cfg, batch, max_len, dtype=self.kv_dtype)

    def prefill(self, cache: Any, batch: int, prompt: list[int]) -> None:
        if self.engine:
            for b in range(batch):
                self.model.prefill(prompt, cache, slot=b, start=0)
        else:
            self.model(torch.tensor([prompt] * batch, dtype=torch.long), cache, 0)

    def step(self, cache: Any, batch: int, pos: int) -> None:
        token = 7 % self.cfg.vocab_size
        if self.engine:
            self.model.decode([token] * batch, cache, list(range(batch)), [pos] * batch)
        else:
            self.model(torch.full((batch, 1), token, dtype=torch.long), cache, pos)

    def head_seconds(self, repeats: int = 3) -> float:
        """Median time of the final norm + LM head on one token (the part that does not scale with depth)."""
        times = []
        for _ in range(repeats):
            x = torch.randn(1, self.cfg.hidden_size)
            t0 = time.perf_counter()
            if self.engine:
                from ..engine.linear import rms_norm

                self.model.head.logits(rms_norm(x, self.model.final_norm, self.cfg.norm_eps))
            else:
                x = x.to(self.model.embed_tokens.weight.dtype).unsqueeze(0)
                self.model.lm_head(self.model.norm(x)).float()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def _build_bitnet(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> tuple[Any, str, bool]:
    from ..kernels import get_backend

    model = random_packed_model(cfg, dtype, seed)
    backend = get_backend(None, "cpu").name
    try:
        from ..engine.model import EngineModel  # type: ignore[import-not-found]

        engine = EngineModel.from_transformer(model, head="bf16" if dtype != torch.float32 else "f32")
        del model
        gc.collect()
        return engine, f"engine+{backend}", True
    except Exception as e:  # the engine is optional (and may be absent): fall back to the Transformer
        return model, f"transformer+{backend} (engine unavailable: {type(e).__name__}: {str(e)[:80]})", False


def _warm_runtime(side: str, dtype: torch.dtype, seed: int) -> int:
    """Load every library the measurement uses by running a tiny model of the same kind; the RSS after it."""
    tiny = get_config("tiny")
    model, _, engine = _build_bitnet(tiny, dtype, seed) if side == "bitnet" else (random_fp_model(tiny, dtype, seed), "", False)
    runner = _Runner(model, tiny, dtype, engine)
    cache = runner.new_cache(2, 8)
    runner.prefill(cache, 1, [1, 2, 3])
    runner.step(cache, 2, 3)
    runner.head_seconds(1)
    del model, runner, cache
    _reset_peak()
    return _rss_now()


def _timed(fn: Any, repeats: int) -> list[float]:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def measure_one(config: str, side: str, settings: BenchSettings, layers: int | None = None) -> dict[str, Any]:
    """Build one model (``side`` "bitnet" or "fp"; ``layers`` blocks, default all) and measure it here."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
        try:
            from ..kernels import native  # type: ignore[attr-defined]

            if native.available():
                native.set_threads(settings.threads)
        except (ImportError, AttributeError):
            pass
    dtype = _DTYPES[settings.fp_dtype]
    base_rss = _warm_runtime(side, dtype, settings.seed)
    full = get_config(config)
    cfg = full.replace(num_layers=layers) if layers else full
    need_ctx = max(settings.prompt_len + settings.decode_steps, settings.throughput_ctx) + 1
    if cfg.max_seq_len < need_ctx:
        cfg = cfg.replace(max_seq_len=need_ctx)
    t0 = time.perf_counter()
    if side == "bitnet":
        model, path, engine = _build_bitnet(cfg, dtype, settings.seed)
    else:
        model, path, engine = random_fp_model(cfg, dtype, settings.seed), f"pytorch {settings.fp_dtype}", False
    build_s = time.perf_counter() - t0
    runner = _Runner(model, cfg, dtype, engine)
    build_peak = _peak_rss()
    _reset_peak()
    out: dict[str, Any] = {"config": config, "side": side, "layers": cfg.num_layers, "path": path,
                           "build_seconds": build_s, "weight_bytes_held": _module_bytes(model),
                           "rss_after_import": base_rss}
    # decode latency, batch 1
    prompt = [(i * 31 + 5) % cfg.vocab_size for i in range(settings.prompt_len)]
    cache = runner.new_cache(1, settings.prompt_len + settings.decode_steps + 1)
    runner.prefill(cache, 1, prompt)
    runner.step(cache, 1, settings.prompt_len)  # warm-up
    steps = _timed(lambda i: runner.step(cache, 1, settings.prompt_len + 1 + i), settings.decode_steps - 1)
    out["decode_seconds"] = statistics.median(steps)
    out["decode_samples"] = steps
    out["head_seconds"] = runner.head_seconds()
    del cache
    out["peak_rss"] = _peak_since_reset() or _peak_rss()
    # throughput at the largest batch that fits the budget
    fp_bytes = torch.empty((), dtype=dtype).element_size()
    budget = settings.budget or 1.15 * weight_bytes(full, "fp", 2)
    fit = max_batch(full, side, budget, settings.throughput_ctx, fp_bytes)
    batch = min(fit, settings.max_batch)
    out.update(budget_bytes=budget, batch_fits=fit, batch=batch)
    if batch > 0:
        ctx = settings.throughput_ctx
        start = ctx - settings.throughput_steps
        cache = runner.new_cache(batch, ctx)
        runner.prefill(cache, 1, prompt[:1])  # the cache content does not change the arithmetic
        if hasattr(cache, "length"):
            cache.length = start
        steps = _timed(lambda i: runner.step(cache, batch, start + i), settings.throughput_steps)
        out["batch_step_seconds"] = statistics.median(steps)
        del cache
    out["peak_rss_build"] = build_peak
    out["peak_rss_batch"] = _peak_since_reset() or _peak_rss()
    return out


def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _reset_peak() -> None:
    """Free what the build left behind and restart the kernel's peak-RSS counter (Linux; else a no-op)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_since_reset() -> int:
    """VmHWM (peak RSS since the last reset) in bytes, or 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_rss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


def _measure_in_subprocess(config: str, side: str, settings: BenchSettings, layers: int | None) -> dict[str, Any]:
    payload = json.dumps({"config": config, "side": side, "layers": layers, "settings": settings.__dict__})
    cmd = [sys.executable, "-m", "bittern.eval.paper_bench", "--worker", payload]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=settings.timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "side": side, "error": f"timed out after {settings.timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"config": config, "side": side, "error": f"worker failed (exit {proc.returncode}): {tail[0][:300]}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the comparison


def _scale(m: dict[str, Any], depth: int) -> dict[str, Any]:
    """Full-depth estimates from a measurement on ``m["layers"]`` blocks."""
    k = m["layers"]
    if k == depth:
        return m
    s = dict(m)
    head = m["head_seconds"]
    s["decode_seconds"] = head + depth / k * max(m["decode_seconds"] - head, 0.0)
    if "batch_step_seconds" in m:
        s["batch_step_seconds"] = m["batch_step_seconds"] * depth / k  # head is a small share at large batch
    return s


def bench_config(config: str, settings: BenchSettings, progress: Any = None) -> dict[str, Any]:
    """Measure (or measure and scale) one config on both sides and compare them."""
    cfg = get_config(config)
    fp_bytes = torch.empty((), dtype=_DTYPES[settings.fp_dtype]).element_size()
    scaled = weight_bytes(cfg, "fp", fp_bytes) > settings.full_limit
    layers = min(settings.scaled_layers, cfg.num_layers) if scaled else None
    row: dict[str, Any] = {"config": config, "mode": "scaled" if scaled else "measured",
                           "measured_layers": layers or cfg.num_layers, "num_layers": cfg.num_layers,
                           "params": cfg.num_params(), "paper": PAPER_RATIOS.get(config, {})}
    sides = {}
    for side in ("fp", "bitnet"):
        if progress is not None:
            progress.set_postfix_str(f"{config} {side}")
        m = _measure_in_subprocess(config, side, settings, layers)
        if "error" in m:
            sides[side] = m
            continue
        m = _scale(m, cfg.num_layers)
        m["weight_bytes"] = weight_bytes(cfg, side, 2)
        if scaled:
            # memory of the whole model: computed weights + what the partial model used beyond its weights
            overhead = max(m["peak_rss"] - m["rss_after_import"] - m["weight_bytes_held"], 0)
            m["peak_rss_model"] = m["weight_bytes"] + overhead
        else:
            m["peak_rss_model"] = m["peak_rss"] - m["rss_after_import"]
        if m.get("batch_step_seconds"):
            m["throughput"] = m["batch"] / m["batch_step_seconds"]
        sides[side] = m
        if progress is not None:
            progress.update(1)
    row.update(sides)
    fp, bn = sides["fp"], sides["bitnet"]
    ratios: dict[str, float | None] = {}
    if "error" not in fp and "error" not in bn:
        ratios["weight_memory"] = fp["weight_bytes"] / bn["weight_bytes"]
        ratios["peak_memory"] = fp["peak_rss_model"] / max(bn["peak_rss_model"], 1)
        ratios["latency"] = fp["decode_seconds"] / bn["decode_seconds"]
        ratios["throughput"] = (bn["throughput"] / fp["throughput"]) if fp.get("throughput") and bn.get("throughput") else None
        ratios["batch"] = (bn["batch_fits"] / fp["batch_fits"]) if fp.get("batch_fits") else None
    row["ratios"] = ratios
    row["energy"] = energy_per_token(cfg, context=settings.throughput_ctx)
    return row


def run_paper_bench(configs: list[str] | tuple[str, ...] = DEFAULT_CONFIGS, settings: BenchSettings | None = None,
                    show_progress: bool = True) -> dict[str, Any]:
    """The whole comparison: one row per config, plus the machine and settings it ran with."""
    from tqdm import tqdm

    settings = settings or BenchSettings()
    if settings.fp_dtype not in _DTYPES:
        raise UsageError(f"--fp-dtype must be one of {sorted(_DTYPES)}")
    for c in configs:
        get_config(c)
    if settings.decode_steps < 2 or settings.prompt_len < 1 or settings.throughput_steps < 1:
        raise UsageError("need prompt_len >= 1, decode_steps >= 2 and throughput_steps >= 1")
    from ..kernels import available_backends

    rows = []
    with tqdm(total=2 * len(configs), desc="paper bench", unit="model", disable=not show_progress) as bar:
        for c in configs:
            rows.append(bench_config(c, settings, bar))
    return {"machine": _machine(), "settings": settings.__dict__, "backends": available_backends(), "rows": rows}


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------- reporting


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a plain-text table (ratios are FP / BitNet, throughput BitNet / FP)."""
    head = (f"{'config':<6} {'mode':<9} {'FP weights':>10} {'BN weights':>10} {'mem':>6} {'paper':>6} "
            f"{'FP peak':>8} {'BN peak':>8} {'peak':>6} {'FP ms/tok':>9} {'BN ms/tok':>9} {'lat':>6} {'paper':>6} "
            f"{'FP tok/s':>12} {'BN tok/s':>12} {'thr':>6} {'paper':>6} {'E7nm':>6} {'E45nm':>6}")
    lines = [head, "-" * len(head)]
    gb = 1e9
    for r in result["rows"]:
        fp, bn, ra, pa = r.get("fp", {}), r.get("bitnet", {}), r.get("ratios", {}), r.get("paper", {})
        if "error" in fp or "error" in bn:
            lines.append(f"{r['config']:<6} error: {fp.get('error') or bn.get('error')}")
            continue
        mode = r["mode"] if r["mode"] == "measured" else f"scaled{r['measured_layers']}"

        def thr(s: dict[str, Any]) -> str:
            return f"{s['throughput']:.1f}@{s['batch']}" if s.get("throughput") else "no fit"

        lines.append(
            f"{r['config']:<6} {mode:<9} {fp['weight_bytes'] / gb:>9.2f}G {bn['weight_bytes'] / gb:>9.2f}G "
            f"{_fmt_ratio(ra.get('weight_memory')):>6} {_fmt_ratio(pa.get('memory')):>6} "
            f"{fp['peak_rss_model'] / gb:>7.2f}G {bn['peak_rss_model'] / gb:>7.2f}G {_fmt_ratio(ra.get('peak_memory')):>6} "
            f"{fp['decode_seconds'] * 1e3:>9.1f} {bn['decode_seconds'] * 1e3:>9.1f} {_fmt_ratio(ra.get('latency')):>6} "
            f"{_fmt_ratio(pa.get('latency')):>6} {thr(fp):>12} {thr(bn):>12} {_fmt_ratio(ra.get('throughput')):>6} "
            f"{_fmt_ratio(pa.get('throughput')):>6} {_fmt_ratio(r['energy']['7nm']['total_ratio']):>6} "
            f"{_fmt_ratio(r['energy']['45nm']['total_ratio']):>6}")
    paths = sorted({r["bitnet"]["path"] for r in result["rows"] if "path" in r.get("bitnet", {})})
    lines.append("")
    lines.append(f"BitNet path: {'; '.join(paths)}   FP: PyTorch {result['settings']['fp_dtype']}   "
                 f"backends: {', '.join(result['backends'])}")
    lines.append("mem/peak/lat: FP / BitNet; thr: BitNet / FP tokens/s at the largest batch fitting the budget (@batch); "
                 "E: FP16 / BitNet arithmetic energy per token (all counted ops); scaledK: K blocks measured, scaled to full depth")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """A PNG bar chart of the measured ratios next to the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("ratios")]
    metrics = [("weight_memory", "memory", "weight memory"), ("latency", "latency", "decode latency"),
               ("throughput", "throughput", "throughput")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    names = [r["config"] + ("*" if r["mode"] == "scaled" else "") for r in rows]
    x = range(len(rows))
    for ax, (key, paper_key, title) in zip(axes, metrics):
        ours = [r["ratios"].get(key) or 0.0 for r in rows]
        paper = [r["paper"].get(paper_key) or 0.0 for r in rows]
        ax.bar([i - 0.2 for i in x], ours, 0.4, label="this machine")
        ax.bar([i + 0.2 for i in x], paper, 0.4, label="paper (GPU)")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{title}: FP16 / BitNet b1.58" if key != "throughput" else "throughput: BitNet b1.58 / FP16")
    axes[0].legend(fontsize=8)
    fp_name = {"bfloat16": "BF16", "float16": "FP16", "float32": "FP32"}.get(result.get("settings", {}).get("fp_dtype"), "FP")
    for ax in axes:
        ax.set_title(ax.get_title().replace("FP16", fp_name), fontsize=10)
    fig.suptitle("BitNet b1.58 vs FP LLaMA of the same shape (* = scaled from a per-layer measurement)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _worker(payload: str) -> None:
    spec = json.loads(payload)
    settings = BenchSettings(**spec["settings"])
    print(json.dumps(measure_one(spec["config"], spec["side"], settings, spec["layers"])))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: python -m bittern.eval.paper_bench --worker JSON (use `bittern bench paper`)")
