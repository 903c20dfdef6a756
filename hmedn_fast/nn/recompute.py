"""Recomputing part of a forward pass in backward (``torch.utils.checkpoint``, non-reentrant) without updating
BatchNorm running statistics twice."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def running_stats_frozen(modules: Iterable[nn.Module]):
    """BatchNorm layers in ``modules`` use batch statistics but leave their running statistics (and batch
    counters) as they were: for the recomputed forward of a checkpointed part."""
    norms = [m for top in modules for m in top.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


@torch.compiler.disable
def recomputed(fn: Callable[..., Any], modules: Iterable[nn.Module], *args: Any,
               preserve_rng_state: bool = True) -> Any:
    """``fn(*args)`` keeping nothing for backward but its inputs; the backward runs it again with the BatchNorm
    layers in ``modules`` (everything ``fn`` runs) leaving their running statistics alone.
    ``preserve_rng_state=False`` for an ``fn`` that draws no random numbers (no CUDA RNG state is read: CUDA-graph
    capture safe). Under ``torch.compile`` this part runs eagerly (a graph break): dynamo cannot trace a
    checkpoint with a ``context_fn`` ("checkpoint not implemented for ... context_fn")."""
    def contexts():
        return contextlib.nullcontext(), running_stats_frozen(modules)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, preserve_rng_state=preserve_rng_state)


__all__ = ["recomputed", "running_stats_frozen"]
