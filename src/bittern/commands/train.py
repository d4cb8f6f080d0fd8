"""Training verbs: ``data prepare``, ``tokenizer train``, ``train``, ``finetune-ternary``, ``pack``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare training data (token shards)")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = dsub.add_parser("prepare", help="tokenize text / JSONL files or directories into memory-mapped token shards")
    q.add_argument("inputs", nargs="+", help=".txt / .jsonl files or directories of them")
    q.add_argument("--tokenizer", required=True, help="tokenizer.json (ours, GPT-2's, ...) or a directory holding one")
    q.add_argument("--out", required=True, help="output shard directory")
    q.add_argument("--val-fraction", type=float, default=0.05, help="share of documents (or of each document's tail) for validation")
    q.add_argument("--split", choices=["document", "tail"], default="document",
                   help="validation by whole documents, or by the contiguous tail of every document")
    q.add_argument("--train-only", nargs="*", default=[], help="files used only for training (never in validation)")
    q.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    q.set_defaults(handler=run_prepare)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    q = tsub.add_parser("train", help="train a byte-level BPE tokenizer (Hugging Face tokenizers)")
    q.add_argument("inputs", nargs="+", help=".txt / .jsonl files or directories of them")
    q.add_argument("--vocab-size", type=int, default=8192)
    q.add_argument("--min-frequency", type=int, default=2)
    q.add_argument("--out", required=True, help="output directory (tokenizer.json is written there)")
    q.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    q.set_defaults(handler=run_tokenizer_train)

    p = sub.add_parser("train", help="train a BitNet b1.58 or FP model (also under torchrun for DDP / FSDP)")
    p.add_argument("--config", help="training config (.json, or .yaml with PyYAML); see configs/")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. lr=1e-3 model.hidden_size=128")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run directory has checkpoints")
    p.set_defaults(handler=run_train)

    p = sub.add_parser("finetune-ternary", help="convert an FP LLaMA-family HF checkpoint to BitNet b1.58 by fine-tuning")
    p.add_argument("hf_dir", help="LlamaForCausalLM directory (config.json + safetensors)")
    p.add_argument("--data", required=True, help="shard directory (made with the model's own tokenizer)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--config", help="training config to start from")
    p.add_argument("--ramp-steps", type=int, default=None, help="quantisation ramp lambda = min(step / ramp, 1) (default: steps / 4)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. steps=500 lr=3e-4")
    p.add_argument("--no-resume", action="store_true")
    p.set_defaults(handler=run_finetune)

    p = sub.add_parser("pack", help="pack a training run's BitNet model (with its tokenizer) into a model directory")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--layout", default="2bit", choices=["2bit", "1.6bit"])
    p.add_argument("--checkpoint", help="a specific checkpoint directory (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.set_defaults(handler=run_pack)


#: the smallest byte-level BPE vocabulary: 256 byte tokens and the end-of-text token
MIN_VOCAB = 257


def run_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..tokenizer import load_tokenizer
    from ..train.data import prepare_shards

    from ..output_dir import fresh_output_dir

    tok_file = Path(args.tokenizer)
    tok_file = tok_file / "tokenizer.json" if tok_file.is_dir() else tok_file
    tokenizer = load_tokenizer(args.tokenizer)
    # written whole or not at all: no shard of an earlier run stays beside the new ones
    with fresh_output_dir(args.out, args.overwrite, sources=[Path(p) for p in args.inputs] + [tok_file]) as out:
        meta = prepare_shards(args.inputs, tokenizer, out, val_fraction=args.val_fraction, split=args.split,
                              train_only=args.train_only, text_field=args.text_field, tokenizer_file=tok_file)
    s = meta["splits"]
    print(f"{args.out}: train {s['train']['tokens']:,} tokens ({s['train']['documents']} documents), "
          f"val {s['val']['tokens']:,} tokens ({s['val']['documents']} documents), {meta['dtype']}")
    return 0


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from ..tokenizer import train_bpe
    from ..train.data import iter_documents, list_inputs

    from ..output_dir import fresh_output_dir

    if args.vocab_size < MIN_VOCAB:
        raise UsageError(f"--vocab-size must be at least {MIN_VOCAB} (256 byte tokens and the end-of-text token); "
                         f"got {args.vocab_size}")
    if args.min_frequency < 1:
        raise UsageError(f"--min-frequency must be at least 1 (got {args.min_frequency})")
    files = list_inputs(args.inputs)
    seen = [False]

    def texts():  # streamed (a corpus may not fit in memory); notes whether any text came
        for _, text in iter_documents(files, args.text_field):
            seen[0] = seen[0] or bool(text.strip())
            yield text

    tok = train_bpe(texts(), vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    if not seen[0]:
        raise UsageError("the inputs hold no text to learn a tokenizer from")
    with fresh_output_dir(args.out, args.overwrite, sources=files) as out:
        tok.save(out)
    print(f"{Path(args.out) / 'tokenizer.json'}: {tok.vocab_size} tokens")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ..train.config import load_train_config
    from ..train.trainer import train

    import os

    summary = train(load_train_config(args.config, args.set), resume=not args.no_resume)
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun
        print(json.dumps({k: v for k, v in summary.items() if k != "model"}, indent=2))
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from ..train.convert import finetune_ternary

    summary = finetune_ternary(args.hf_dir, args.data, args.out, config_file=args.config, ramp_steps=args.ramp_steps,
                               overrides=args.set, resume=not args.no_resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "model"}, indent=2))
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from ..output_dir import fresh_output_dir
    from ..train.export import pack_run

    run = Path(args.run_dir)
    # never into the run's checkpoints (that would replace one), nor over the run directory itself
    with fresh_output_dir(args.out_dir, args.overwrite, protect=[run / "checkpoints"], sources=[run]) as out:
        pack_run(args.run_dir, out, layout=args.layout, checkpoint=args.checkpoint)
    print(f"packed model written to {args.out_dir}")
    return 0
