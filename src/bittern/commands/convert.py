"""``bittern convert SRC DST``: Hugging Face / GGUF / bittern models from one format to another."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a model between Hugging Face, GGUF and bittern packed formats",
                       description="SRC: a bittern model directory, a Hugging Face checkpoint directory, a .gguf file "
                                   "or a Hub repo id (owner/name). DST: the output directory (or .gguf file).")
    p.add_argument("src", help="source model: directory, .gguf file or Hugging Face repo id")
    p.add_argument("dst", help="output path (a directory for bittern/hf, a file for gguf)")
    p.add_argument("--to", choices=["bittern", "hf", "gguf"], default=None,
                   help="output format (default: gguf when DST ends in .gguf, else bittern)")
    p.add_argument("--layout", default="2bit",
                   help="bittern packed layout: 2bit (default) or 1.6bit, or a native kernel layout: 2bit-r4, "
                        "1.6bit-r4, 1.67bit-lut")
    p.add_argument("--weight-type", default="TQ2_0", choices=["TQ2_0", "TQ1_0", "F16"],
                   help="GGUF type of the ternary weights (default TQ2_0)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="type of embeddings/norms (default: float16 for bittern/gguf, bfloat16 for hf)")
    p.add_argument("--hf-linear-class", default="bitlinear", choices=["bitlinear", "autobitlinear"],
                   help="HF scale convention: bitlinear stores 1/gamma (2B4T), autobitlinear stores gamma")
    p.add_argument("--revision", default=None, help="Hub revision when SRC is a repo id")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it exists (the old directory is removed whole once the new one is complete)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..interop import convert

    to = args.to or ("gguf" if str(args.dst).endswith(".gguf") else "bittern")
    out = convert(args.src, args.dst, to=to, layout=args.layout, weight_type=args.weight_type, dtype=args.dtype,
                  hf_linear_class=args.hf_linear_class, revision=args.revision, overwrite=args.overwrite)
    print(f"wrote {to} model to {out}")
    return 0
