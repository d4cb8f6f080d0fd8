"""Many processes: process-group set-up, DDP / FSDP2 wrapping, and full (unsharded) state dicts.

Launch the same trainer under ``torchrun --nproc-per-node N``; ``RANK``/``WORLD_SIZE`` come from the
environment. The backend is NCCL on CUDA and gloo on CPU. Checkpoints always hold full, unsharded
state keyed by parameter name, so a run can resume under a different number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError


@dataclass
class DistEnv:
    """Where this process stands: rank, world size, device and the parallelism in use."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(mode: str = "auto") -> DistEnv:
    """Join the process group when launched with several processes; ``mode`` none/ddp/fsdp/auto."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world <= 1:
        return DistEnv(device=torch.device("cuda") if cuda else torch.device("cpu"))
    if mode == "none":
        raise UsageError(f"distributed='none' but WORLD_SIZE={world}: use ddp or fsdp under torchrun")
    if mode == "auto":
        mode = "ddp"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local, device, mode)


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """``model`` as DDP, or sharded in place with FSDP2 (``fully_shard`` per block, then the root)."""
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if env.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (FSDP2 shards in place: the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def set_grad_sync(model: nn.Module, env: DistEnv, enabled: bool):
    """Context manager: gradient all-reduce on (last micro-batch) or off (accumulating)."""
    import contextlib

    if enabled or env.mode == "none":
        if env.mode == "fsdp":
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if env.mode == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> tuple[dict, dict]:
    """Full model and optimizer state dicts on the CPU, keyed by parameter name (all ranks call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=env.active)
    return get_state_dict(model, optimizer, options=opts)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict | None,
                    env: DistEnv) -> None:
    """Load full state dicts (as :func:`full_state` returns) into a possibly sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    if optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over all processes (the tensor itself when alone)."""
    if not env.active:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / env.world


def barrier(env: DistEnv) -> None:
    """Wait for every process (no-op when alone)."""
    if env.active:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    """Leave the process group if this module joined one."""
    if env.active and dist.is_initialized():
        dist.destroy_process_group()
