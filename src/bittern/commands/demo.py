"""``bittern demo``: train, pack and sample a tiny BitNet b1.58 model with its FP twin."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a tiny BitNet b1.58 model and its FP twin on embedded Shakespeare, pack it, generate")
    p.add_argument("--out", default="runs/demo", help="directory for the packed model (default: runs/demo)")
    p.add_argument("--steps", type=int, default=300, help="training steps per model (default: 300)")
    p.add_argument("--max-seconds", type=float, default=45.0,
                   help="time cap for the BitNet run (default: 45); the FP twin trains as many steps")
    p.add_argument("--layout", default="2bit", help="packed layout (2bit or 1.6bit)")
    p.add_argument("--prompt", default="ROMEO:", help="prompt for the sample")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds something other than an earlier demo's model")
    p.set_defaults(handler=run)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any training, an --out that is a file or a non-empty directory that an earlier demo
    did not write (a demo run replaces its own earlier model; anything else needs --overwrite)."""
    from ..errors import UsageError

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    try:
        meta = json.loads((out / "config.json").read_text()).get("meta", {})
    except (OSError, ValueError, AttributeError):
        meta = {}
    if not (isinstance(meta, dict) and meta.get("trained_by") == "bittern demo"):
        raise UsageError(f"--out {out} holds files that an earlier demo did not write: choose another directory "
                         "or pass --overwrite")


def run(args: argparse.Namespace) -> int:
    from ..demo import format_demo_table, run_demo

    if args.steps <= 0 or not 0 < args.max_seconds < float("inf"):
        raise ValueError("--steps and --max-seconds must be positive")
    from ..output_dir import check_output_file
    from ..pack import get_layout

    get_layout(args.layout)  # an unknown layout fails now, not after training
    _check_out(Path(args.out), args.overwrite)
    if args.json:
        check_output_file(args.json, "--json")
    result = run_demo(args.out, steps=args.steps, max_seconds=args.max_seconds, layout=args.layout, prompt=args.prompt)
    print()
    print(format_demo_table(result))
    print(f"\npacked model written to {result['out_dir']}")
    print(f"\nsample (packed BitNet b1.58, integer path):\n{result['sample']['prompt']}{result['sample']['text']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
