"""The ``lm_eval`` command line with the ``bittern`` model adapter registered and bittern's task configs included.

Usage is exactly lm-eval's (``python -m bittern.eval.lm_eval_cli --help``); for example::

    python -m bittern.eval.lm_eval_cli run --model bittern --model_args pretrained=runs/demo,batch_size=8 \\
        --tasks bittern_piqa,bittern_arc_easy --limit 100

``--include_path`` defaults to bittern's task directory (:func:`bittern.eval.task_data.tasks_dir`).
The plain ``lm_eval`` CLI has no plugin discovery for models, so it cannot see the ``"bittern"``
adapter unless something imports :mod:`bittern.eval.lm_eval_adapter` first: this wrapper does.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's CLI on ``argv`` (default ``sys.argv[1:]``)."""
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_adapter  # noqa: F401  (registers the "bittern" model)
    from .task_data import tasks_dir

    args = list(sys.argv[1:] if argv is None else argv)
    if args and "--include_path" not in args and not any(a.startswith("--include_path=") for a in args):
        if args[0] in ("run", "ls", "validate") or args[0].startswith("-"):
            args += ["--include_path", str(tasks_dir())]
    sys.argv = [sys.argv[0]] + args
    cli_evaluate()


if __name__ == "__main__":
    main()
