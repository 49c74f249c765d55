"""Data-parallel training on several GPUs (or CPU processes): the process-group helpers.

`torchrun --nproc_per_node=N train.py ...` starts N copies of train.py and tells each its RANK, LOCAL_RANK
and WORLD_SIZE (plus MASTER_ADDR/PORT to meet at). Each copy holds a full replica of the model and trains
on its own share of every batch; after backward the gradients are averaged over the replicas
(all-reduce), so every replica takes the same optimiser step and the replicas stay identical:

    g = (1 / N) sum_r g_r,   g_r = gradient of the mean loss over rank r's B examples
      = gradient of the mean loss over the global batch of N * B examples

DistributedDataParallel (DDP) does the averaging during backward, bucket by bucket. The rules here:
- every rank draws the same global batch of N * B examples from the per-step random stream and keeps its
  slice (`shard`), so N GPUs at batch B see the data one GPU would see at batch N * B;
- only rank 0 writes files, plots and progress bars; every rank reads checkpoints (so --resume works);
- decisions that end a loop (Ctrl-C) are agreed on by all ranks (`any_rank`), or the others would wait
  forever in the next all-reduce.
Without torchrun (WORLD_SIZE unset) every helper is the single-process identity.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (or anything else that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device, timeout_seconds: float = 1800) -> torch.device:
    """Join the process group (NCCL between GPUs, gloo between CPU processes); returns this rank's device.

    Reads RANK, WORLD_SIZE and LOCAL_RANK from the environment (torchrun sets them); a CUDA device becomes
    cuda:LOCAL_RANK, one GPU per process.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_seconds),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return device


def cleanup() -> None:
    """Leave the process group. Call `barrier()` first on the normal path: a rank that tears the group down
    (rank 0 also hosts its TCP store) while another still talks to it can make that one abort."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and shows progress."""
    return rank() == 0


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global batch [N * B, ...] -> [B, ...] (the identity on one process)."""
    b = len(batch) // world_size()
    return batch[rank() * b:(rank() + 1) * b]


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP around `module` when distributed (gradients averaged in backward), else the module itself.

    Call the wrapper for the forward pass (the averaging hooks need it); keep the plain module for
    state_dict(), EMA and sampling.
    """
    if not is_distributed():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def average_gradients(params) -> None:
    """g <- (1 / N) sum_r g_r by hand: what DDP does, for a module called several times per backward
    (the discriminator scores real and fake images in two calls, which DDP's hooks do not allow)."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def broadcast_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank: for state updated outside the gradients
    (the VQ codebook's EMA and dead-code restarts use each rank's own batch, so they would drift apart)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (e.g. Ctrl-C reached only some processes)."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@torch.no_grad()
def check_in_sync(module: torch.nn.Module, rtol: float = 1e-6) -> None:
    """Raise on every rank if the replicas of `module` differ (compares sum(x) and sum(x^2) per tensor).

    Data parallelism is only right while the replicas are identical; a state update that one rank makes
    on its own data and forgets to share shows up here, at the next checkpoint, instead of never.
    """
    if not is_distributed():
        return
    names, tensors = zip(*(list(module.named_parameters()) + list(module.named_buffers())))
    stats = torch.stack([torch.stack([t.double().sum(), t.double().pow(2).sum()]) for t in tensors])  # [n, 2]
    low, high = stats.clone(), stats.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    drift = ((high - low) > rtol * (high.abs() + 1e-12)).any(dim=1)
    if drift.any():
        bad = [n for n, d in zip(names, drift.tolist()) if d]
        raise RuntimeError(f"the {world_size()} replicas of the model differ in {len(bad)} tensors (first: {bad[0]}); "
                           "some state is updated per rank without being shared.")


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written the checkpoint the next stage reads)."""
    if is_distributed():
        dist.barrier()
