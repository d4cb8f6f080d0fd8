"""The demo: train a tiny BitNet b1.58 model and its FP twin on embedded Shakespeare, pack, generate.

Everything it reports is measured in the run: parameters, bytes on disk, resident weight bytes,
bits per weight and validation loss of both models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .configs import ModelConfig, get_config
from .generate import generate_text
from .model import Transformer
from .modelfile import WEIGHTS_FILE, load_packed, save_packed
from .sampling import SamplingParams
from .tokenizer import Tokenizer, train_bpe


def demo_text() -> str:
    """The ~1 MB of Shakespeare shipped inside the package."""
    return resources.files("bittern.data").joinpath("shakespeare.txt").read_text(encoding="utf-8")


@dataclass
class TrainResult:
    """What one training run of the demo measured."""

    steps: int
    seconds: float
    val_loss: float
    tokens_per_second: float


def batches(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Endless random windows ``(inputs, targets)`` of ``seq_len`` tokens from a 1-D token tensor."""
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        window = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def evaluate_loss(model: Transformer, data: torch.Tensor, seq_len: int, max_windows: int = 32) -> float:
    """Mean next-token cross-entropy over consecutive non-overlapping windows of ``data``."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // seq_len)
    x = data[: n * seq_len].view(n, seq_len)
    y = data[1 : n * seq_len + 1].view(n, seq_len)
    losses = [F.cross_entropy(model(x[i : i + 8]).flatten(0, 1), y[i : i + 8].flatten()) * len(x[i : i + 8]) for i in range(0, n, 8)]
    model.train()
    return float(torch.stack(losses).sum() / n)


def train_model(config: ModelConfig, train: torch.Tensor, val: torch.Tensor, steps: int, max_seconds: float,
                batch_size: int = 16, seq_len: int = 128, seed: int = 0, label: str = "") -> tuple[Transformer, TrainResult]:
    """Train with AdamW, warm-up then linear decay (BitNet: ~6x the FP learning rate, as the FAQ advises)."""
    torch.manual_seed(seed)
    model = Transformer(config).train()
    peak_lr = 3e-3 if config.linear == "bitnet" else 1e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(1, steps // 10)
    stream = batches(train, batch_size, seq_len, torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    done = 0
    bar = tqdm(range(steps), desc=f"train {label}", unit="step", leave=True)
    for step in bar:
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (1.0 - 0.9 * step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(stream)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        if time.perf_counter() - start > max_seconds:
            break
    bar.close()
    seconds = time.perf_counter() - start
    result = TrainResult(done, seconds, evaluate_loss(model, val, seq_len), done * batch_size * seq_len / seconds)
    return model.eval(), result


def idle_threads() -> int:
    """Threads to train with: the cores not already busy (OpenMP slows ~10x when oversubscribed)."""
    import os

    cores = torch.get_num_threads()
    try:
        busy = int(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, (os.cpu_count() or cores) - busy))


def resident_weight_bytes(model: Transformer) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def run_demo(out_dir: str | Path = "runs/demo", steps: int = 300, max_seconds: float = 45.0, layout: str = "2bit",
             prompt: str = "ROMEO:", max_tokens: int = 60, seed: int = 0) -> dict:
    """Run the whole demo and return the measured figures (also writes the packed model to ``out_dir``)."""
    torch.set_num_threads(idle_threads())
    out_dir = Path(out_dir)
    text = demo_text()
    split = int(len(text) * 0.9)
    base = get_config("demo")
    tokenizer: Tokenizer = train_bpe([text[:split]], vocab_size=base.vocab_size)
    data = torch.tensor(tokenizer.encode(text[:split]), dtype=torch.long)
    val = torch.tensor(tokenizer.encode(text[split:]), dtype=torch.long)

    bitnet, bit_res = train_model(base, data, val, steps, max_seconds, seed=seed, label="BitNet b1.58")
    fp, fp_res = train_model(base.replace(linear="fp"), data, val, bit_res.steps, float("inf"), seed=seed, label="FP twin")

    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = tokenizer.save(out_dir / "tokenizer")
    save_packed(bitnet, out_dir, layout=layout, dtype="float16", tokenizer_file=tok_dir,
                meta={"trained_by": "bittern demo", "steps": bit_res.steps, "val_loss": bit_res.val_loss})
    packed = load_packed(out_dir)
    packed_val = evaluate_loss(packed, val, 128)
    sample = generate_text(packed, tokenizer, prompt, SamplingParams(temperature=0.8, top_k=40, seed=seed, max_tokens=max_tokens))

    ternary = packed.config.num_linear_params()
    packed_code_bytes = sum(m.weight_packed.numel() for m in packed.packed_linears().values())
    disk = (out_dir / WEIGHTS_FILE).stat().st_size
    fp_disk_fp16 = sum(p.numel() for p in fp.parameters()) * 2
    return {
        "config": base.to_dict(),
        "tokens_train": len(data), "tokens_val": len(val),
        "bitnet": {"params": base.num_params(), "ternary_weights": ternary, "steps": bit_res.steps,
                   "train_seconds": bit_res.seconds, "tokens_per_second": bit_res.tokens_per_second,
                   "val_loss": bit_res.val_loss, "val_loss_packed": packed_val, "disk_bytes": disk,
                   "resident_weight_bytes": resident_weight_bytes(packed),
                   "bits_per_linear_weight": 8 * packed_code_bytes / ternary},
        "fp": {"params": fp.config.num_params(), "steps": fp_res.steps, "train_seconds": fp_res.seconds,
               "tokens_per_second": fp_res.tokens_per_second, "val_loss": fp_res.val_loss,
               "disk_bytes_fp16": fp_disk_fp16, "resident_weight_bytes": resident_weight_bytes(fp),
               "bits_per_linear_weight": 32.0},
        "sample": {"prompt": prompt, "text": sample},
        "out_dir": str(out_dir),
    }


def format_demo_table(r: dict) -> str:
    """The demo's summary table as text."""
    b, f = r["bitnet"], r["fp"]
    rows = [
        ("parameters", f"{b['params']:,}", f"{f['params']:,}"),
        ("linear-layer weights", f"{b['ternary_weights']:,}", f"{b['ternary_weights']:,}"),
        ("training steps", f"{b['steps']}", f"{f['steps']}"),
        ("training tokens/s", f"{b['tokens_per_second']:,.0f}", f"{f['tokens_per_second']:,.0f}"),
        ("bytes on disk", f"{b['disk_bytes']:,} (packed)", f"{f['disk_bytes_fp16']:,} (fp16)"),
        ("resident weight bytes", f"{b['resident_weight_bytes']:,}", f"{f['resident_weight_bytes']:,} (fp32)"),
        ("bits per linear weight", f"{b['bits_per_linear_weight']:.2f}", f"{f['bits_per_linear_weight']:.0f}"),
        ("validation loss", f"{b['val_loss']:.4f} (packed: {b['val_loss_packed']:.4f})", f"{f['val_loss']:.4f}"),
        ("validation perplexity", f"{math.exp(b['val_loss']):.2f}", f"{math.exp(f['val_loss']):.2f}"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "BitNet b1.58", "")])
    lines = [f"{'':{w0}}  {'BitNet b1.58':>{w1}}  FP twin", "-" * (w0 + w1 + 24)]
    lines += [f"{a:{w0}}  {b_:>{w1}}  {c}" for a, b_, c in rows]
    return "\n".join(lines)
