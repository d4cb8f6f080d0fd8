"""Checks on the output files of the eval and bench commands, made before any measuring starts.

A bench that runs for minutes and only then finds it cannot write its JSON (or, worse, overwrites one
of its inputs) wastes the run: :func:`check_output_file` refuses such a path up front.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import UsageError
from ..output_dir import check_output_path


def check_output_file(path: str | os.PathLike, flag: str, inputs: Iterable[str | os.PathLike] = (),
                      create_parents: bool = False) -> Path:
    """``path`` as a :class:`Path` if a command can write its ``flag`` output there; else :class:`UsageError`.

    Refused: an empty name, one of ``inputs`` (it would be overwritten), an existing directory, a file
    that cannot be written, and a parent directory that is missing (unless ``create_parents``: then
    the nearest existing ancestor must be a writable directory) or not writable. An existing file is
    replaced, as these commands always did.
    """
    if not str(path).strip():
        raise UsageError(f"{flag} needs a file name")
    dest = Path(path)
    if dest.is_dir():
        raise UsageError(f"{flag}: {dest} is a directory; give a file name")
    resolved = dest.expanduser().resolve()
    for p in inputs:
        if Path(p).expanduser().resolve() == resolved:
            raise UsageError(f"{flag}: {dest} is one of the inputs; write the output to another file")
    try:
        check_output_path(dest, overwrite=True, kind="file", sources=[Path(p) for p in inputs])
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from None
    if dest.exists() and not os.access(dest, os.W_OK):
        raise UsageError(f"{flag}: {dest} is not writable")
    parent = dest.expanduser().absolute().parent
    if create_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.exists():
        raise UsageError(f"{flag}: directory {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise UsageError(f"{flag}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: directory {parent} is not writable")
    return dest


def check_distinct(paths: dict[str, str | os.PathLike | None]) -> None:
    """Refuse two output flags naming the same file (``{"--json": ..., "--png": ...}``; None is skipped)."""
    seen: dict[Path, str] = {}
    for flag, p in paths.items():
        if not p:
            continue
        key = Path(p).expanduser().resolve()
        if key in seen:
            raise UsageError(f"{seen[key]} and {flag} name the same file {p}; give them different files")
        seen[key] = flag
