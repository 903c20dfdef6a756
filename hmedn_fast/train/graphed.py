"""Whole training steps replayed from a CUDA graph (no per-kernel host launch cost).

A training step of hmedn_3d_l2 launches a few thousand kernels; on the GPU machines' hosts that costs more time
than some of the kernels take (H200: ~71 ms of wall time for ~58 ms of kernels in the lean mode). Capturing the
whole step (forward, loss, backward, gradient clipping, optimizer update) once and replaying it removes the
launch cost: the GPU runs the step back to back. This is PyTorch's "whole-network capture"
(``torch.cuda.graph``) packaged so that every call is still exactly one training step on the given inputs.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor


WARMUP = 2  # eager steps before capture, by default


def _signature(inputs: tuple[Tensor, ...]) -> tuple:
    return tuple((t.shape, t.dtype, t.stride(), t.device) for t in inputs)


class GraphedStep:
    """``GraphedStep(step)(*inputs)`` runs ``step(*inputs)`` and returns its output, replaying a CUDA graph.

    ``step`` is one whole training step on CUDA tensors: it sets the gradients to None (``zero_grad()``), runs
    forward, loss, backward and the optimizer update, and returns a tensor or a tuple of tensors (e.g. the loss
    values) without reading anything back to the host. The first ``warmup`` calls for an input signature (shapes,
    dtypes, strides, device) run ``step`` eagerly on a side stream: real training steps that let cuDNN time its
    algorithms, the optimizer create its state and the Triton kernels compile. The next call captures ``step``
    into a graph (capturing runs nothing), then replays it; later calls copy their inputs into the graph's input
    buffers and replay. So every call is one training step on its inputs, as the eager ``step`` would be.

    The returned tensors are the graph's output buffers: read (or clone) them before the next call. A call with a
    new input signature frees the graph and warms up and captures anew (with a ``RuntimeWarning``); so does
    :meth:`reset` (call it after anything that changes which kernels the step runs, e.g. a new checkpointing
    level).

    ``step`` must be capturable, as any CUDA graph: no host synchronisation (``.item()``, ``.tolist()``,
    ``bool(tensor)``, printing tensors), no CPU tensors read by kernels, a fixed sequence of kernels, and an
    optimizer whose update reads its hyper-parameters from device memory: e.g.
    ``torch.optim.AdamW(params, lr=torch.tensor(lr, device="cuda"), fused=True)`` (a float learning rate would be
    frozen into the graph; learning-rate schedulers update a tensor learning rate in place). The graph keeps its
    own memory pool: the step's peak memory stays reserved between calls. A capture that fails frees the graph (the
    next call warms up again); one that ran out of memory raises ``torch.OutOfMemoryError`` even where ending the
    interrupted capture raised an error of its own.

    With ``static_inputs=True`` the graph is captured on the input tensors of the capturing call themselves (no
    input buffers: one batch of inputs less memory, no copies per call): every later call must pass those same
    tensors, with the next batch written into them in place (``x_buffer.copy_(batch)``), else ``ValueError``.

    Args:
        step: the training step, called as ``step(*inputs)``.
        warmup: eager steps before capturing (>= 1: the optimizer's state must exist before capture).
        static_inputs: capture and replay on the caller's input tensors (see above) instead of copies.
    """

    def __init__(self, step: Callable[..., Any], warmup: int = WARMUP, static_inputs: bool = False) -> None:
        if not callable(step):
            raise TypeError(f"step must be callable, got {type(step).__name__}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (the optimizer's state must exist before capture), "
                             f"got {warmup!r}")
        if not isinstance(static_inputs, bool):
            raise TypeError(f"static_inputs must be a bool, got {type(static_inputs).__name__}")
        self.step = step
        self.warmup = warmup
        self.static_inputs = static_inputs
        self.captures = 0  # graphs captured so far (tests, logs)
        self._signature: tuple | None = None
        self.reset()

    def reset(self) -> None:
        """Free the graph; the next calls warm up and capture again."""
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: tuple[Tensor, ...] = ()
        self._output: Any = None
        self._warm = 0

    def __call__(self, *inputs: Tensor) -> Any:
        if not inputs or not all(isinstance(t, Tensor) and t.is_cuda for t in inputs):
            raise ValueError("GraphedStep takes one or more CUDA tensors as inputs; got "
                             f"{[type(t).__name__ if not isinstance(t, Tensor) else str(t.device) for t in inputs]}")
        signature = _signature(inputs)
        if signature != self._signature:
            if self._graph is not None:
                warnings.warn("GraphedStep: the inputs' shapes, dtypes or strides changed; capturing a new graph "
                              "(the step runs eagerly for the warm-up steps)", RuntimeWarning, stacklevel=2)
            self.reset()
            self._signature = signature
        if self._graph is None:  # warm-up and capture run on streams of the inputs' device; replay on the graph's
            if self._warm < self.warmup:
                self._warm += 1
                return self._eager(inputs)
            self._capture(inputs)
        if self.static_inputs:
            if any(t.data_ptr() != buffer.data_ptr() for buffer, t in zip(self._inputs, inputs)):
                raise ValueError("GraphedStep(static_inputs=True) replays on the input tensors it captured: pass "
                                 "those same tensors, with the new batch copied into them in place")
        else:
            for buffer, t in zip(self._inputs, inputs):
                buffer.copy_(t)
        self._graph.replay()
        return self._output

    def _eager(self, inputs: tuple[Tensor, ...]) -> Any:
        """One step on a side stream, as capture needs its warm-up (lazy initialisations off the default stream)."""
        device = inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = self.step(*inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        return out

    def _capture(self, inputs: tuple[Tensor, ...]) -> None:
        device = inputs[0].device
        self._inputs = inputs if self.static_inputs else tuple(torch.empty_like(t) for t in inputs)  # dense inputs
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the warm-up steps' cached blocks: the graph allocates from its own pool
        graph = torch.cuda.CUDAGraph()
        try:  # a capture stream of the inputs' device (torch.cuda.graph's default is one stream per process, made
            # on whichever device was current at the process's first capture)
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
                self._output = self.step(*self._inputs)
        except Exception as err:
            self.reset()  # the next call warms up and captures anew
            if not isinstance(err, torch.OutOfMemoryError) and _out_of_memory_in(err):
                # ending an interrupted capture can raise its own error over the allocator's: keep the OOM visible
                # to callers that handle it (the trainer escalates checkpointing and retries)
                raise torch.OutOfMemoryError(f"out of memory while capturing the step's CUDA graph ({err})") from err
            raise
        self._graph = graph
        self.captures += 1


def _out_of_memory_in(err: BaseException) -> bool:
    """Whether an out-of-memory error is ``err`` or in the chain of exceptions that led to it."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, torch.OutOfMemoryError):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


__all__ = ["WARMUP", "GraphedStep"]
