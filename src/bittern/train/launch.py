"""Run the trainer in several local processes without torchrun (gloo on CPU): for tests and small machines."""

from __future__ import annotations

import os
import socket
from typing import Any

from .config import TrainConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict[str, Any], resume: bool) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from .trainer import train

    train(TrainConfig.from_dict(cfg_dict), resume=resume)


def train_multiprocess(cfg: TrainConfig, nprocs: int, resume: bool = True) -> None:
    """Train ``cfg`` in ``nprocs`` spawned processes on this machine (``cfg.distributed`` picks DDP or FSDP)."""
    import torch.multiprocessing as mp

    cfg.validate()
    if nprocs < 2:
        raise ValueError("train_multiprocess needs at least 2 processes; call train() for one")
    mp.start_processes(_worker, args=(nprocs, _free_port(), cfg.to_dict(), resume), nprocs=nprocs, start_method="spawn")
