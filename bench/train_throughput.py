"""Training throughput (tokens/s) of BitNet b1.58 (fake quantisation + STE) vs the FP model of the same shape.

    python bench/train_throughput.py --hidden 256 --layers 4 --heads 4 --ffn 688 --vocab 4096 \
        --batch 8 --seq 128 --steps 10 --threads 1

Times forward + backward + AdamW steps on random tokens (after warm-up steps), alternating BitNet and
FP repeats so both see the same machine load, and reports the median per-step rate and the ratio.
By default it counts this process's CPU time (``--clock cpu``), which a shared, busy machine
disturbs far less than wall time; with one thread that is the single-core throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bittern.configs import ModelConfig
from bittern.model import Transformer


class _FakeQuantActivation(torch.autograd.Function):
    """Per-token int8 fake quantisation in one fused-ish pass; identity gradient (the STE) without residual tensors."""

    @staticmethod
    def forward(ctx, x):
        s = 127.0 / x.detach().float().abs().amax(-1, keepdim=True).clamp(min=1e-5)
        return (x.float() * s).round_().clamp_(-128, 127).div_(s).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


class _FakeQuantWeight(torch.autograd.Function):
    """Absmean ternary fake quantisation; identity gradient."""

    @staticmethod
    def forward(ctx, w):
        gamma = w.detach().float().abs().mean().clamp(min=1e-5)
        return (w.float() / gamma).round_().clamp_(-1, 1).mul_(gamma).to(w.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def use_autograd_functions() -> None:
    """Swap BitLinear's STE helpers for the autograd-Function versions above (same values, fewer passes)."""
    import bittern.layers as layers

    layers.ste_activation = lambda x, strength=1.0: _FakeQuantActivation.apply(x)
    layers.ste_weight = lambda w, strength=1.0: _FakeQuantWeight.apply(w)


def step_times(model: Transformer, tokens: torch.Tensor, steps: int, warmup: int, clock=time.perf_counter) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=True)
    times = []
    for i in range(warmup + steps):
        t = clock()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(clock() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--variant", choices=["stock", "autograd-fn"], default="stock",
                    help="stock: bittern.quant's STE as shipped; autograd-fn: the fused autograd.Function twin (a proposed fix)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: this process's CPU time (robust on a shared machine; use with --threads 1); wall: elapsed time")
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant == "autograd-fn":
        use_autograd_functions()
    base = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                       intermediate_size=args.ffn, max_seq_len=args.seq + 1, name="bench")
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    per = {"bitnet": [], "fp": []}
    for _ in range(args.repeats):
        for kind in ("bitnet", "fp"):
            torch.manual_seed(0)
            model = Transformer(base.replace(linear=kind)).train()
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            per[kind] += step_times(model, tokens, args.steps, args.warmup, clock)
    tok = args.batch * args.seq
    res = {kind: {"median_step_s": statistics.median(t), "tokens_per_s": tok / statistics.median(t)} for kind, t in per.items()}
    res["ratio_fp_over_bitnet_tokens_per_s"] = res["fp"]["tokens_per_s"] / res["bitnet"]["tokens_per_s"]
    res["shape"] = base.to_dict()
    res["non_embedding_params"] = base.num_params(include_embeddings=False)
    res["batch_tokens"] = tok
    res["threads"] = torch.get_num_threads()
    res["variant"] = args.variant
    res["clock"] = args.clock
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
