"""Training checkpoints: atomic, keep-last-N, no pickle.

A run directory holds ``checkpoints/step_NNNNNNNN/`` with

- ``model.safetensors`` — latent weights (float32; a tied LM head is not stored twice),
- ``optimizer.pt`` — optimizer state keyed by parameter name, plus RNG states (a tensors-only
  ``torch.save``, read back with ``weights_only=True``),
- ``state.json`` — step, data-loader position, tokens seen, the training config;

and ``checkpoints/latest``, naming the newest complete one. A checkpoint is written into a hidden
temporary directory that is renamed into place when complete, and ``latest`` is replaced atomically
after that, so a crash at any point leaves the previous checkpoint intact and current.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..modelfile import atomic_write, read_safetensors

CHECKPOINTS = "checkpoints"
LATEST = "latest"


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


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(model_state, optimizer_state, state)`` of a checkpoint directory (no pickle is executed)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise UsageError(f"{path}: not a checkpoint (no state.json)")
    tensors, _ = read_safetensors(path / "model.safetensors", mmap_file=False)
    optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return {k: v.clone() for k, v in tensors.items()}, optim, state


def load_model_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Only the weights and ``state.json`` of a checkpoint (for packing and evaluation)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise UsageError(f"{path}: not a checkpoint (no state.json)")
    tensors, _ = read_safetensors(path / "model.safetensors", mmap_file=False)
    return {k: v.clone() for k, v in tensors.items()}, json.loads((path / "state.json").read_text())
