"""Backend choice by measurement, per input signature, the way ``torch.backends.cudnn.benchmark`` picks cuDNN's
algorithms.

An op with two interchangeable backends (e.g. the Triton convolution kernels and cuDNN) keeps a static rule for
which one is faster, measured on one card. Which one wins depends on the card (the H200 sweeps behind the rules
and an H100 disagree on several shapes: ``docs/decisions/blocks.md``), so while ``cudnn.benchmark`` is on, the
first automatic call with a new signature on CUDA times every backend on that call's own inputs and the process
keeps the fastest; later calls with that signature take it without timing. Without ``cudnn.benchmark``, on the
CPU, while a CUDA graph is being captured or while ``torch.compile`` traces, a remembered choice is used if there
is one, else the static rule.

Timing runs each backend once to warm it up (Triton compilation, cuDNN's own algorithm search), then ``reps``
times between two CUDA events, the GPU held busy while the host queues them (GPU time, not the host's launch
cost: small shapes would otherwise compare the two backends' host paths): one host synchronisation per backend,
on the first call of a signature only. A backend running out of memory while timed (e.g. near a memory cap)
leaves the static rule in charge for that call and the signature is timed again on its next call.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Hashable, Mapping

import torch

_CHOICES: dict[Hashable, tuple[str, dict[str, float]]] = {}  # signature -> (backend, the times it was chosen from)


def can_measure(*tensors: torch.Tensor) -> bool:
    """Whether a new signature may be timed now: ``cudnn.benchmark`` on, every tensor on CUDA, no stream capture,
    no ``torch.compile`` tracing."""
    return (bool(torch.backends.cudnn.benchmark) and all(t.is_cuda for t in tensors)
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())


_HOLD_CYCLES = 4_000_000  # ~2 ms of GPU clock: longer than the host takes to queue the timed calls


def _time_ms(run: Callable[[], object], reps: int) -> float:
    """GPU milliseconds of ``reps`` back-to-back calls of ``run`` after one warm-up call (CUDA events). The GPU
    is held busy (``torch.cuda._sleep``) while the host queues the calls, so the host's launch cost is not
    counted: what a CUDA-graph replay (the trainer's lean + graph step) runs, and what ``cudnn.benchmark``
    compares for cuDNN's own algorithms."""
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(_HOLD_CYCLES)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def choice(key: Hashable, runners: Mapping[str, Callable[[], object]], default: str, tensors: tuple[torch.Tensor, ...],
           reps: int = 5) -> str:
    """The backend to use for the signature ``key``.

    Args:
        key: everything the speed depends on (op name, shapes, strides, dtypes, device, op arguments).
        runners: backend name -> a call doing the op's work with that backend on the current inputs.
        default: the static rule's backend, used when nothing is remembered and timing is not possible now.
        tensors: the inputs (see :func:`can_measure`).
        reps: timed calls per backend.
    Returns:
        A key of ``runners`` (or ``default``).
    """
    if default not in runners:
        raise ValueError(f"default must be one of {sorted(runners)}, got {default!r}")
    remembered = _CHOICES.get(key)
    if remembered is not None:
        return remembered[0]
    device = next((t.device for t in tensors if t.is_cuda), None)
    # the capture check, the events and the GPU hold act on the current device: make it the inputs' (e.g. cuda:1)
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        if not can_measure(*tensors):
            return default
        try:
            times = {name: _time_ms(run, reps) for name, run in runners.items()}
        except torch.cuda.OutOfMemoryError:  # timing must not fail where the default alone would run: not remembered
            return default
    best = min(times, key=times.__getitem__)
    _CHOICES[key] = best, times
    return best


def remembered() -> dict[Hashable, str]:
    """A copy of the choices made so far in this process (signature -> backend)."""
    return {key: backend for key, (backend, _) in _CHOICES.items()}


def timings() -> dict[Hashable, dict[str, float]]:
    """The GPU milliseconds (``reps`` calls) each remembered choice was made from: signature -> {backend: ms}."""
    return {key: dict(times) for key, (_, times) in _CHOICES.items()}


def forget() -> None:
    """Drop every remembered choice and its timings (the next call of each signature is timed again)."""
    _CHOICES.clear()


__all__ = ["can_measure", "choice", "forget", "remembered", "timings"]
