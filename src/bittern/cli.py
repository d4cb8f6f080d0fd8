"""The ``bittern`` command line: a thin dispatcher over verbs defined in :mod:`bittern.commands`.

Each module in ``bittern/commands/`` defines ``register(subparsers)``, adding one or more verbs whose
handlers take the parsed arguments and call plain library functions. Errors a user can fix
(:class:`UsageError`, bad files, bad values) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import warnings

from . import commands
from .errors import UsageError
from .modelfile import ModelFileError
from .quant import NonFiniteError


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every verb registered."""
    parser = argparse.ArgumentParser(prog="bittern", description="1.58-bit (BitNet b1.58) language models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bittern`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    # warnings read as the command's own messages, without Python's file:line and source line
    python_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest, **kw: f"bittern {args.command}: warning: {message}\n"
    try:
        return _run(args)
    finally:
        warnings.formatwarning = python_format


def _run(args: argparse.Namespace) -> int:
    try:
        result = args.handler(args)
    except BrokenPipeError:
        # the reader of our output went away (``| head``): stop quietly, as a command killed by SIGPIPE
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except (UsageError, ModelFileError, NonFiniteError, ValueError) as e:
        print(f"bittern {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written: its name and the reason are enough
        where = f"{e.filename}: " if e.filename else ""
        print(f"bittern {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
