"""Writing a model directory so that a failure, or an existing directory, never leaves a mix of files.

:func:`fresh_output_dir` hands out a temporary directory beside the destination; the writer fills it,
and only when it has finished does the directory take the destination's name (an existing one is
replaced only when asked to). A failed write removes the temporary directory and leaves the
destination as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError


def check_output_path(dest: Path, overwrite: bool, kind: str = "directory", protect: Iterable[Path] = (),
                      sources: Iterable[Path] = ()) -> None:
    """Refuse ``dest`` when it is inside one of ``protect``, holds one of ``sources`` (replacing it would
    delete them), is the wrong kind of thing (a file where a directory goes, or the reverse), or already
    holds something and ``overwrite`` is false."""
    resolved = dest.expanduser().resolve()
    if kind == "file" and dest.is_dir():
        raise UsageError(f"{dest} is a directory; give a file name for the output")
    for s in sources:
        s = Path(s).expanduser().resolve()
        if s == resolved:
            raise UsageError(f"{dest} is one of the inputs; write the output somewhere else")
        if resolved in s.parents:
            raise UsageError(f"{dest} holds the input {s}; write the output somewhere else")
    for p in protect:
        p = Path(p).expanduser().resolve()
        if resolved == p or p in resolved.parents:
            raise UsageError(f"{dest}: inside {p}, which this command must not write into; choose another output")
    if not dest.exists():
        return
    if kind == "directory" and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a directory")
    if not overwrite and (kind == "file" or any(dest.iterdir())):
        raise UsageError(f"{dest} already exists{'' if kind == 'file' else ' and is not empty'}: choose a new "
                         f"output or pass --overwrite to replace it")


@contextmanager
def fresh_output_dir(dest: str | os.PathLike, overwrite: bool = False, protect: Iterable[Path] = (),
                     sources: Iterable[Path] = ()) -> Iterator[Path]:
    """A temporary directory to write into that becomes ``dest`` when the block ends without error
    (checked first with :func:`check_output_path`)."""
    dest = Path(dest)
    check_output_path(dest, overwrite, "directory", protect, sources)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_file(path: str | os.PathLike, flag: str, inputs: Iterable[str | os.PathLike] = (),
                      create_parents: bool = False) -> Path:
    """``path`` as a :class:`Path` if a command can write its ``flag`` output file there (replacing an
    existing file, as these outputs always did); else :class:`UsageError`, before any work is done.

    Refused besides what :func:`check_output_path` refuses (a directory, one of ``inputs``): an empty
    name, a file that cannot be written, and a parent directory that is missing (with
    ``create_parents``: the nearest existing ancestor must be a writable directory) or not writable.
    """
    if not str(path).strip():
        raise UsageError(f"{flag} needs a file name")
    dest = Path(path)
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
