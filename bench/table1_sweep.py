"""The BitNet b1.58 paper's Table 1 in miniature: BitNet b1.58 vs FP at three sizes, same tokens and data order.

    nohup python bench/table1_sweep.py --out runs/table1 > runs/table1.log 2>&1 &

Steps (each skipped when its output exists, so the script can be rerun or resumed):

1. a byte-level BPE tokenizer trained on the training part of /work/shared/data/corpus;
2. token shards, validation = the contiguous 2% tail of every file; ``tdavid.txt`` (which quotes the
   KJV Psalms) is training-only so no quoted Psalm leaks into validation;
3. for each size, ``bittern train`` for BitNet b1.58 (two-stage lr, peak 6x the FP lr as the FAQ
   advises, weight decay 0.1 then 0) and FP (cosine, weight decay 0.1) with identical seeds, token
   budget and batch order;
4. ``results.json`` and ``table.md`` (validation perplexity and bits per byte, wall times, commands).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CORPUS = Path("/work/shared/data/corpus")
VAL_FILES = ["shakespeare.txt", "austen.txt", "kjv.txt", "milton.txt", "jargon.txt"]
TRAIN_ONLY = ["tdavid.txt"]
VAL_FRACTION = 0.02

# hidden, layers, heads, ffn — LLaMA-shaped (ffn ~ 8/3 hidden), vocab from the tokenizer
SIZES = {
    "S": dict(hidden_size=192, num_layers=4, num_heads=6, intermediate_size=512),  # 1.8M non-embedding
    "M": dict(hidden_size=320, num_layers=6, num_heads=5, intermediate_size=864),  # 7.4M
    "L": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376),  # 25.3M
}


def run(cmd: list[str], log: Path) -> float:
    """Run a command (output to ``log``), return its wall time; raise if it fails."""
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t


def prepare(out: Path, vocab: int, bittern: list[str]) -> Path:
    tok_dir, shards = out / "tokenizer", out / "shards"
    if not (tok_dir / "tokenizer.json").is_file():
        from bittern.tokenizer import train_bpe

        texts = []
        for name in VAL_FILES + TRAIN_ONLY:
            t = (CORPUS / name).read_text(encoding="utf-8")
            texts.append(t if name in TRAIN_ONLY else t[: int(len(t) * (1 - 1.5 * VAL_FRACTION))])
        train_bpe(texts, vocab_size=vocab).save(tok_dir)
    if not (shards / "meta.json").is_file():
        run(bittern + ["data", "prepare", *[str(CORPUS / n) for n in VAL_FILES], "--train-only",
                       *[str(CORPUS / n) for n in TRAIN_ONLY], "--tokenizer", str(tok_dir), "--out", str(shards),
                       "--split", "tail", "--val-fraction", str(VAL_FRACTION)], out / "prepare.log")
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/table1")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--sizes", default="S,M,L")
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--fp-lr", type=float, default=1e-3)
    ap.add_argument("--bitnet-lr-ratio", type=float, default=6.0, help="BitNet peak lr / FP peak lr (FAQ: about 6)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (BitNet and FP of one size)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bittern = [sys.executable, "-m", "bittern"]
    t_prep = time.perf_counter()
    shards = prepare(out, args.vocab, bittern)
    prep_seconds = time.perf_counter() - t_prep
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    results.update({"steps": args.steps, "batch": args.batch, "seq": args.seq, "tokens_per_run": args.steps * args.batch * args.seq,
                    "fp_lr": args.fp_lr, "bitnet_lr": args.fp_lr * args.bitnet_lr_ratio, "threads": args.threads,
                    "parallel": args.parallel,
                    "prepare_seconds": results.get("prepare_seconds", prep_seconds)})
    warmup = max(10, args.steps // 20)
    for size in args.sizes.split(","):
        pending = []
        for linear in ("bitnet", "fp"):
            key = f"{size}-{linear}"
            if key in results["runs"]:
                continue
            run_dir = out / key
            model = {"name": "tiny", "vocab_size": args.vocab, "num_kv_heads": SIZES[size]["num_heads"],
                     "max_seq_len": args.seq, "linear": linear, **SIZES[size]}
            lr = args.fp_lr * (args.bitnet_lr_ratio if linear == "bitnet" else 1.0)
            cmd = bittern + ["train", "--no-resume", "--set", f"data={shards}", f"out_dir={run_dir}",
                             "model=" + json.dumps(model, separators=(",", ":")), f"steps={args.steps}",
                             f"batch_size={args.batch}", f"seq_len={args.seq}", f"lr={lr}", f"warmup={warmup}",
                             "weight_decay=0.1", f"eval_every={max(1, args.steps // 2)}", "eval_windows=128",
                             f"save_every={args.steps}", "keep_last=1", f"num_threads={args.threads}", "progress=false", "seed=0"]
            pending.append((key, size, linear, lr, run_dir, cmd))
        # BitNet and FP of one size side by side (--parallel 2, one core each): both see the same load
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            walls = list(pool.map(lambda job: run(job[5], out / f"{job[0]}.log"), pending))
        for (key, size, linear, lr, run_dir, cmd), wall in zip(pending, walls):
            summary = json.loads((run_dir / "summary.json").read_text())
            results["runs"][key] = {"size": size, "linear": linear, "lr": lr, "wall_seconds": wall, "command": shlex.join(cmd[2:]),
                                    **{k: summary[k] for k in ("val_loss", "val_ppl", "val_bpb", "tokens", "non_embedding_params",
                                                               "params", "tokens_per_s")}}
            results_path.write_text(json.dumps(results, indent=2))
            print(f"{key}: val ppl {summary['val_ppl']:.2f}, bpb {summary['val_bpb']:.4f}, {wall:.0f} s", flush=True)
    (out / "table.md").write_text(format_table(results))
    print(format_table(results))


def format_table(results: dict) -> str:
    rows = ["| size | non-emb params | BitNet b1.58 ppl | FP ppl | ppl gap | BitNet bpb | FP bpb | BitNet wall s | FP wall s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for size in SIZES:
        b, f = results["runs"].get(f"{size}-bitnet"), results["runs"].get(f"{size}-fp")
        if not b or not f:
            continue
        gap = 100 * (b["val_ppl"] / f["val_ppl"] - 1)
        rows.append(f"| {size} | {b['non_embedding_params'] / 1e6:.2f}M | {b['val_ppl']:.2f} | {f['val_ppl']:.2f} | {gap:+.1f}% | "
                    f"{b['val_bpb']:.4f} | {f['val_bpb']:.4f} | {b['wall_seconds']:.0f} | {f['wall_seconds']:.0f} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
