"""``bittern demo``: train, pack and sample a tiny BitNet b1.58 model with its FP twin."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny BitNet b1.58 model and its FP twin on embedded Shakespeare, pack it, generate")
    p.add_argument("--out", default="runs/demo", help="directory for the packed model (default: runs/demo)")
    p.add_argument("--steps", type=int, default=300, help="training steps per model (default: 300)")
    p.add_argument("--max-seconds", type=float, default=45.0, help="time cap for the BitNet run; the FP twin trains as many steps")
    p.add_argument("--layout", default="2bit", help="packed layout (2bit or 1.6bit)")
    p.add_argument("--prompt", default="ROMEO:", help="prompt for the sample")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import format_demo_table, run_demo

    if args.steps <= 0 or args.max_seconds <= 0:
        raise ValueError("--steps and --max-seconds must be positive")
    result = run_demo(args.out, steps=args.steps, max_seconds=args.max_seconds, layout=args.layout, prompt=args.prompt)
    print()
    print(format_demo_table(result))
    print(f"\npacked model written to {result['out_dir']}")
    print(f"\nsample (packed BitNet b1.58, integer path):\n{result['sample']['prompt']}{result['sample']['text']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
