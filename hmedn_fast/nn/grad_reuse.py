"""Reuse of an incoming gradient as a backward pass's accumulation buffer, when nothing else can see it.

A custom ``autograd.Function`` whose backward accumulates into a buffer shaped like its output (the lean dense
block's gradient buffer) can write into the gradient it receives instead of copying it first, if no one else holds
that tensor: the engine keeps the incoming gradient alive until the backward returns, so a copy doubles the
buffer's memory at the step's peak (384 MiB for hmedn_3d_l2's full-resolution decoder block at 128^3).

The gradient can be shared: autograd passes one tensor to several nodes (``a + b`` hands the same gradient to
both), ``y.backward(g)`` hands the caller's ``g``, a tensor hook may keep it, or it is a view of a larger gradient
(``torch.cat``'s backward). :func:`exclusive` accepts it only when its reference counts (Python references, C++
references to the tensor, references to its storage) equal those of a gradient known to be private: one measured
once per process (:func:`prepare`, from the Function's forward) by :class:`_Probe` through the same call structure
(a ``once_differentiable`` backward passing the gradient two calls down), so the baseline follows the Python and
PyTorch versions; without a baseline nothing is reused. It also has to own its whole storage (not a view), be dense
in the wanted layout and dtype, and not be traced by ``torch.compile``. Anything else is copied, as before.
``ENABLED = False`` turns the reuse off (benchmarks compare both).
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

ENABLED = True
reused = 0  # gradients reused so far in this process (diagnostics, tests)
_baseline: tuple[int, int, int] | None = None


def prepare() -> None:
    """Measure the baseline counts once per process (a tiny CPU forward + backward). Called by a Function's forward
    so that the measurement never runs inside a backward pass."""
    global _baseline
    if _baseline is None and ENABLED and not torch.compiler.is_compiling():
        x = torch.ones(4, requires_grad=True)
        with torch.enable_grad():
            (_Probe.apply(x) * 2.0).sum().backward()  # MulBackward makes a fresh, private gradient
        _baseline = _Probe.seen


class _Probe(torch.autograd.Function):
    """Identity whose backward records the counts of a private incoming gradient (see the module doc)."""

    seen: tuple[int, int, int] = (0, 0, 0)

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        _Probe.seen = _probe(grad)
        return grad.clone()


def _probe(grad: Tensor) -> tuple[int, int, int]:
    return _measure(grad)  # the same depth as exclusive() -> _measure()


def _measure(grad: Tensor) -> tuple[int, int, int]:
    """(Python references, C++ references to the TensorImpl, references to the storage) of ``grad``."""
    return sys.getrefcount(grad), grad._use_count(), torch._C._storage_Use_Count(grad.untyped_storage()._cdata)


def exclusive(grad: Tensor, dtype: torch.dtype, memory_format: torch.memory_format) -> bool:
    """Whether ``grad``, received by a ``once_differentiable`` backward and passed straight here (no other local
    reference made before), may be written in place: private (module doc), ``dtype``, dense in ``memory_format``
    and owning its whole storage."""
    if (not ENABLED or _baseline is None or torch.compiler.is_compiling() or grad._base is not None
            or grad.requires_grad):
        return False
    if grad.dtype != dtype or not grad.is_contiguous(memory_format=memory_format):
        return False
    if grad.untyped_storage().nbytes() != grad.numel() * grad.element_size():
        return False
    if _measure(grad) != _baseline:
        return False
    global reused
    reused += 1
    return True


__all__ = ["ENABLED", "exclusive", "prepare"]
