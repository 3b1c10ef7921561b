"""Scale-out: data parallelism for the drafter (DDP) and FSDP sharding of a frozen target.

Under `torchrun --nproc-per-node N -m vsd_ext train ...` every process runs the same
loop on its share of each global batch (`TrainConfig` docstring); DDP all-reduces the
drafter's gradients (averaging them: the mean over N equal shares is the mean over all
micro-batches, the single-process result). Backend: NCCL with CUDA, gloo on CPU.

FSDP (`--fsdp-target`): each decoder layer of the target is `fully_shard`-ed over all
processes, so a target too large for one device is stored 1/N per process and gathered one
layer at a time as its forward runs (the layers are called as modules, which is what fires
FSDP's hooks). The embedding, final norm and LM head stay replicated: the drafter shares the
embedding and the target reads the head directly. Every process must run the target the
same number of times in the same order (the gathers are collectives): the objectives keep
their shapes independent of the data, and evaluation runs on every process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) — initializing the default process group from torchrun's
    environment when WORLD_SIZE > 1 (single process: (0, 1, cuda:0 or cpu))."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on any process (every process must call it: a collective)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def shard_target(target) -> None:
    """FSDP2 `fully_shard` of every decoder layer of a frozen target over all processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not is_distributed():
        raise ValueError("--fsdp-target needs several processes (run under torchrun)")
    mesh = init_device_mesh(target.device.type, (dist.get_world_size(),))
    for layer in target.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)


def wrap_data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP over the drafter's parameters (buffers such as d2t are constant: not broadcast)."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
