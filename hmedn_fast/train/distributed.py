"""Data-parallel training through ``torch.distributed`` (DDP), launched with ``torchrun``.

``torchrun --nproc_per_node=R -m hmedn_fast.train ...`` (or ``hmedn train``) sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` reads them (a plain launch is a world of one). The global batch is
``R * batch_size``: the sample indices of each global step are split between ranks
(:class:`hmedn_fast.data.datasets.StepBatchSampler`) and every sample is a function of its index, so ``R``
ranks see exactly the samples of one process at the same global batch. With BatchNorm on CUDA the model's
norms become ``SyncBatchNorm`` (statistics over the global batch) unless ``sync_bn=False``; on the CPU (gloo,
tests) use instance or group norm for per-sample statistics. Rank 0 validates, logs and writes checkpoints.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hmedn_fast.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (nccl on CUDA, gloo on the CPU), or return
    a single-process context when ``WORLD_SIZE`` is unset or 1. On CUDA each rank uses ``cuda:LOCAL_RANK``; a single
    process makes its device (``device``, resolved) the current one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        if dev.type == "cuda":  # e.g. cuda:1: kernels, streams and graphs that use the current device follow
            torch.cuda.set_device(dev)
        return DistContext(0, 1, dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, dev)


def wrap_model(model: nn.Module, ctx: DistContext, sync_bn: bool = True, level: str = "none") -> nn.Module:
    """DDP-wrap ``model`` (already on ``ctx.device``) when running distributed, its norms made as
    :func:`sync_norms` says. The unwrapped model stays reachable as ``.module``."""
    if not ctx.distributed:
        return model
    model = sync_norms(model, ctx, sync_bn, level)
    if ctx.device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index])
    return nn.parallel.DistributedDataParallel(model)


def sync_norms(model: nn.Module, ctx: DistContext, sync_bn: bool, level: str) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when running distributed on CUDA with ``sync_bn`` (in place; the model's
    ``hmedn_config`` kept); a warning when that takes the memory-lean blocks of checkpointing ``level`` away (they
    need per-process statistics). ``model`` unchanged otherwise."""
    if not (ctx.distributed and ctx.device.type == "cuda" and sync_bn):
        return model
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and level != "none" and ctx.is_main:
        warnings.warn(f"SyncBatchNorm (sync_bn, the multi-GPU default) cannot run in the memory-lean blocks: at "
                      f"checkpointing level {level!r} the BatchNorm blocks run eager or checkpointed, using more "
                      f"memory than on one GPU; --no-sync-bn keeps per-GPU BatchNorm statistics and the lean blocks",
                      RuntimeWarning, stacklevel=2)
    config = getattr(model, "hmedn_config", None)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config is not None:
        model.hmedn_config = config
    return model


def all_reduce_mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of ``t`` over the ranks (``t`` itself in a single process)."""
    if ctx.distributed:
        t = t.clone()
        dist.all_reduce(t)
        t /= ctx.world_size
    return t


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (no-op in a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
