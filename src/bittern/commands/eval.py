"""``bittern eval``: perplexity on text files (``ppl``) and zero-shot tasks through lm-eval (``tasks``)."""

from __future__ import annotations

import argparse
import json
import math
import os

from ..errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: perplexity on text files, zero-shot tasks (lm-eval)")
    verbs = p.add_subparsers(dest="eval_command", metavar="WHAT")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    q = verbs.add_parser("ppl", help="perplexity and bits per byte on text files (sliding window)")
    q.add_argument("files", nargs="+", help="UTF-8 text files; each is scored as one document")
    q.add_argument("--model", help="bittern packed model directory (with tokenizer.json); default: the shipped model")
    q.add_argument("--context", type=int, help="window length in tokens (default: the model's context)")
    q.add_argument("--stride", type=int, help="tokens between window starts (default: half the context)")
    q.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="float parameters' dtype")
    q.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write the result as JSON (to stdout without FILE)")
    q.set_defaults(handler=run_ppl)

    t = verbs.add_parser("tasks", help="zero-shot tasks (HellaSwag, PIQA, WinoGrande, BoolQ, ARC, OpenBookQA, LAMBADA) via lm-eval, offline")
    t.add_argument("--model", help="bittern packed model directory (with tokenizer.json); default: the shipped model")
    t.add_argument("--tasks", default="hellaswag,piqa,winogrande,boolq,arc_easy,arc_challenge,openbookqa,lambada",
                   help="comma-separated task names (default: all eight)")
    t.add_argument("--limit", type=int, help="documents per task (default: all)")
    t.add_argument("--num-fewshot", type=int, help="few-shot examples (default: 0)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="float parameters' dtype")
    t.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write lm-eval's results as JSON (to stdout without FILE)")
    t.set_defaults(handler=run_tasks)


def _write_json(target: str, data: dict) -> None:
    text = json.dumps(data, indent=2, default=str)
    if target == "-":
        print(text)
    else:
        with open(target, "w") as f:
            f.write(text + "\n")


def _check_ppl_args(args: argparse.Namespace) -> None:
    """Refuse values ``eval ppl`` cannot use, and an unwritable --json, before the model loads."""
    from ..output_dir import check_output_file

    if args.context is not None and args.context < 2:
        raise UsageError(f"--context must be at least 2 tokens, got {args.context}")
    if args.stride is not None and args.stride < 1:
        raise UsageError(f"--stride must be at least 1 token, got {args.stride}")
    if args.context is not None and args.stride is not None and args.stride > args.context:
        raise UsageError(f"--stride ({args.stride}) must not exceed --context ({args.context})")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.json is not None and args.json != "-":
        check_output_file(args.json, "--json", inputs=args.files)


def run_ppl(args: argparse.Namespace) -> int:
    """``bittern eval ppl``: perplexity and bits per byte of each file, printed or as JSON."""
    import torch

    from ..eval.perplexity import load_model_and_tokenizer, perplexity, read_texts, resolve_model_path

    _check_ppl_args(args)
    texts = read_texts(args.files)
    model_dir = resolve_model_path(args.model)
    model, tokenizer = load_model_and_tokenizer(model_dir, getattr(torch, args.dtype))
    result = perplexity(model, tokenizer, texts, context=args.context, stride=args.stride, batch_size=args.batch_size)
    data = dict(result.to_dict(), model=str(model_dir))
    if args.json == "-":
        _write_json("-", data)
        return 0
    for t in result.texts:
        print(f"{t.name}: {t.tokens} tokens, {t.bytes} bytes, perplexity {t.perplexity:.4f}, bits/byte {t.bits_per_byte:.4f}")
    if len(result.texts) > 1:
        print(f"all: {result.tokens} tokens, perplexity {result.perplexity:.4f}, bits/byte {result.bits_per_byte:.4f}")
    print(f"(context {result.context}, stride {result.stride}, model {model_dir})")
    if args.json:
        _write_json(args.json, data)
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    """``bittern eval tasks``: zero-shot accuracy through lm-eval, printed or as JSON."""
    from ..output_dir import check_output_file

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a positive number of documents, got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.json is not None and args.json != "-":
        check_output_file(args.json, "--json")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from ..eval.lm_eval_adapter import evaluate_tasks
    except ImportError as e:
        raise UsageError(f"zero-shot tasks need lm-eval: pip install lm-eval ({e})") from None
    from ..eval.perplexity import resolve_model_path
    from ..eval.task_data import task_name

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks names no task")
    for t in tasks:
        task_name(t)  # an unknown name fails here, before the model loads
    model_dir = str(resolve_model_path(args.model))
    out = evaluate_tasks(model_dir, tasks, limit=args.limit, batch_size=args.batch_size,
                         num_fewshot=args.num_fewshot, dtype=args.dtype)
    results = out.get("results", {})
    data = {"model": model_dir, "tasks": tasks, "limit": args.limit,
            "num_fewshot": 0 if args.num_fewshot is None else args.num_fewshot,
            "batch_size": args.batch_size, "dtype": args.dtype, "results": results,
            "n-samples": out.get("n-samples")}
    if args.json == "-":
        _write_json("-", data)
        return 0
    print(f"{'task':<24} {'metric':<12} {'value':>10}")
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or "stderr" in key or not isinstance(value, (int, float)):
                continue
            shown = f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:.3g}"
            print(f"{task:<24} {key.split(',')[0]:<12} {shown:>10}")
    if args.json:
        _write_json(args.json, data)
    return 0
