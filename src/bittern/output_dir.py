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
    for s in sources:
        s = Path(s).expanduser().resolve()
        if s == resolved or resolved in s.parents:
            raise UsageError(f"{dest} holds the input {s}; write the output somewhere else")
    for p in protect:
        p = Path(p).expanduser().resolve()
        if resolved == p or p in resolved.parents:
            raise UsageError(f"{dest}: inside {p}, which this command must not write into; choose another output")
    if not dest.exists():
        return
    if kind == "directory" and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a directory")
    if kind == "file" and dest.is_dir():
        raise UsageError(f"{dest} is a directory; give a file name for the output")
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
