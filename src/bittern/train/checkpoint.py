"""Training checkpoints: atomic, keep-last-N, no pickle.

A run directory holds ``checkpoints/step_NNNNNNNN/`` with

- ``model.safetensors`` — latent weights (float32; a tied LM head is not stored twice),
- ``optimizer.pt`` — optimizer state keyed by parameter name, plus RNG states (a tensors-only
  ``torch.save``, read back with ``weights_only=True``),
- ``state.json`` — step, data-loader position, tokens seen, the training config;

and ``checkpoints/latest``, naming the newest complete one. A checkpoint is written into a hidden
temporary directory that is renamed into place when complete, and ``latest`` is replaced atomically
after that, so a crash at any point leaves the previous checkpoint intact and current; a temporary
directory a killed process left behind is removed when a run next starts (:func:`remove_stale_temp_dirs`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..modelfile import atomic_write, read_safetensors

CHECKPOINTS = "checkpoints"
LATEST = "latest"
_TMP_NAME = re.compile(r"\.tmp-step_\d{8,}-(\d+)")  # what save_checkpoint writes into: .tmp-step_NNNNNNNN-PID


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def save_checkpoint(run_dir: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor],
                    optim_state: dict[str, Any], state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write one checkpoint atomically, point ``latest`` at it and delete all but the newest ``keep_last``."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    final = checkpoint_dir(run_dir, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save(optim_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    for f in tmp.iterdir():  # make the data durable before the rename publishes it
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write(root / LATEST, lambda p: p.write_text(final.name + "\n"))
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):
        return True  # exists (another user's), or cannot tell: keep its directory
    return True


def remove_stale_temp_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary checkpoint directories that interrupted saves left behind; returns them.

    Only names :func:`save_checkpoint` writes (``.tmp-step_NNNNNNNN-PID``) are touched, and only when
    that process is gone (or is this one, which is not saving yet); complete checkpoints never are.
    """
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        m = _TMP_NAME.fullmatch(p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or not _process_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.json").is_file())


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names (falling back to the newest complete one), or None."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "state.json").is_file():
            return cand
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def short_reason(err: BaseException, path: os.PathLike | str | None = None) -> str:
    """A one-line gist of an exception's message (its first sentence, without a leading ``path: ``)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    if path is not None and text.startswith(f"{path}: "):
        text = text[len(f"{path}: "):]
    if ". " in text:
        text = text[:text.index(". ")]
    return text if len(text) <= 200 else text[:199] + "…"


def _damaged(path: Path, file: str, err: Exception) -> UsageError:
    reason = short_reason(err, path / file)
    return UsageError(f"{path / file}: the checkpoint is damaged or incomplete ({reason}); remove {path} to resume "
                      "from the previous checkpoint")


def _read_parts(path: Path, optimizer: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    if not (path / "state.json").is_file():
        raise UsageError(f"{path}: not a checkpoint (no state.json)")
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step")
    except (UnicodeDecodeError, ValueError) as e:
        raise _damaged(path, "state.json", e) from None
    try:
        tensors, _ = read_safetensors(path / "model.safetensors", mmap_file=False)
        tensors = {k: v.clone() for k, v in tensors.items()}
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # a truncated or garbled file fails in many ways; all mean the same to the user
        raise _damaged(path, "model.safetensors", e) from None
    optim = None
    if optimizer:
        try:
            optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            if not isinstance(optim, dict):
                raise ValueError(f"holds a {type(optim).__name__}, not a dict")
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as e:
            raise _damaged(path, "optimizer.pt", e) from None
    return tensors, optim, state


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(model_state, optimizer_state, state)`` of a checkpoint directory (no pickle is executed).

    A damaged file raises :class:`UsageError` naming it.
    """
    tensors, optim, state = _read_parts(Path(path), optimizer=True)
    assert optim is not None
    return tensors, optim, state


def load_model_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Only the weights and ``state.json`` of a checkpoint (for packing and evaluation)."""
    tensors, _, state = _read_parts(Path(path), optimizer=False)
    return tensors, state
