#!/usr/bin/env python
"""A long prompt arrives while other requests generate: how long do the running streams wait?

On the engine's continuous-batching generator (what ``bittern serve`` runs), ``--running`` requests
decode; ``--warm-steps`` steps after they all have their first token, a request with a ``--long``-token
prompt joins. For each ``prefill_chunk`` setting it reports, from its arrival until it has finished, the
running requests' largest, p99 and median gap between tokens (the first gap counted from the arrival),
its time to first token, and the tokens per second generated in that time.

``prefill_chunk=none`` prefills a new prompt whole, in a pass of its own before the step (the running
streams wait for all of it); a number carries that many prompt tokens in each step's pass, next to the
running requests' rows (they get a token every step while the prompt is prefilled).

    python bench/prefill_mix.py --model DIR                      # none, 64, 256, 1024; 2 threads
    python bench/prefill_mix.py --model DIR --long 2000 --running 8 --json runs/prefill_mix.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def one_run(engine, chunk: int | None, running: int, long: int, new_tokens: int, warm_steps: int, seed: int) -> dict:
    from bittern.sampling import SamplingParams

    vocab = engine.model.config.vocab_size
    gen_ids = torch.Generator().manual_seed(seed)
    short = [torch.randint(0, vocab, (24,), generator=gen_ids).tolist() for _ in range(running)]
    long_ids = torch.randint(0, vocab, (long,), generator=gen_ids).tolist()
    max_len = min(engine.context, long + new_tokens + warm_steps + 24 * running + 32)
    gen = engine.batch_generator(max_batch=running + 1, max_len=max_len, prefill_chunk=chunk)
    params = SamplingParams(max_tokens=warm_steps + 10_000)
    ids = [gen.add(p, params) for p in short]
    started: set[int] = set()
    while len(started) < running:  # every running request past its prompt
        started.update(o.request_id for o in gen.step())
    for _ in range(warm_steps):
        gen.step()
    last: dict[int, float] = {}
    gaps: list[float] = []
    generated = 0
    t0 = time.perf_counter()
    long_id = gen.add(long_ids, SamplingParams(max_tokens=new_tokens))
    long_first = None
    step = 0
    while long_id in gen.requests:
        outs = gen.step()
        now = time.perf_counter()
        step += 1
        for o in outs:
            generated += 1
            if o.request_id == long_id:
                long_first = long_first or now
                continue
            gaps.append(now - last.get(o.request_id, t0))
            last[o.request_id] = now
    wall = time.perf_counter() - t0
    for rid in ids:
        gen.cancel(rid)
    gaps.sort()
    return {"prefill_chunk": chunk, "running": running, "long_prompt": long, "steps_after_arrival": step,
            "max_gap_s": gaps[-1] if gaps else float("nan"),
            "p99_gap_s": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else float("nan"),
            "p50_gap_s": gaps[len(gaps) // 2] if gaps else float("nan"),
            "long_ttft_s": (long_first - t0) if long_first else float("nan"),
            "wall_s": wall, "generated": generated, "tok_per_s": generated / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="packed model directory")
    p.add_argument("--chunks", default="none,64,256,1024", help="prefill_chunk settings (default: none,64,256,1024)")
    p.add_argument("--running", type=int, default=8, help="requests generating when the long prompt arrives (default: 8)")
    p.add_argument("--long", type=int, default=1500, help="tokens of the arriving prompt (default: 1500)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens the long request generates (default: 8)")
    p.add_argument("--warm-steps", type=int, default=4, help="decode steps before it arrives (default: 4)")
    p.add_argument("--threads", type=int, default=2, help="kernel threads (default: 2)")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    from bittern.engine import Engine

    chunks = [None if c.strip().lower() == "none" else int(c) for c in args.chunks.split(",")]
    if any(c is not None and c < 1 for c in chunks) or args.running < 1 or args.long < 1 or args.new_tokens < 1:
        p.error("chunks, --running, --long and --new-tokens must be positive")
    engine = Engine.load(args.model, threads=args.threads)
    if args.long + args.new_tokens + 1 > engine.context:
        p.error(f"--long {args.long} does not fit the model's context of {engine.context}")
    one_run(engine, 256, 2, 64, 2, 1, seed=1)  # warm-up: page in the weights, build the kernels' tables
    rows = []
    print(f"{args.running} requests generating; a {args.long}-token prompt joins after {args.warm_steps} steps "
          f"({args.threads} threads)")
    print(f"{'prefill_chunk':>13s} {'max gap s':>10s} {'p99 gap s':>10s} {'p50 gap s':>10s} {'long TTFT s':>12s} "
          f"{'wall s':>7s} {'tok/s':>6s}")
    for c in chunks:
        r = one_run(engine, c, args.running, args.long, args.new_tokens, args.warm_steps, seed=2)
        rows.append(r)
        print(f"{str(c):>13s} {r['max_gap_s']:10.2f} {r['p99_gap_s']:10.2f} {r['p50_gap_s']:10.3f} "
              f"{r['long_ttft_s']:12.2f} {r['wall_s']:7.1f} {r['tok_per_s']:6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": args.threads, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
