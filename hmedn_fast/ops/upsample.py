"""(Bi/tri)linear upsampling (``align_corners=False``) whose backward avoids PyTorch's atomic scatter.

Backends: ``"triton"`` (forward ``F.interpolate``, backward the separable gather of
:mod:`hmedn_fast.ops.triton.upsample`) for integer factors on CUDA (or ``TRITON_INTERPRET=1``) when a gradient
is needed; else ``"reference"`` (``F.interpolate`` and its autograd).
``backend=`` or ``HMEDN_BACKEND_UPSAMPLE`` force one. While ``torch.compile`` or ``torch.jit.trace`` (ONNX /
TorchScript export) traces, plain ``F.interpolate`` with the sizes as given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hmedn_fast.ops.dispatch import choose_backend, triton_unavailable

MAX_FACTOR = 16  # the gather reads 3 f fine voxels per coarse one and axis (unrolled)


class _GatherBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, size: tuple[int, ...], mode: str, factors: tuple[int, ...]) -> Tensor:
        ctx.factors, ctx.dtype = factors, x.dtype
        return F.interpolate(x, size=size, mode=mode, align_corners=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        from hmedn_fast.ops.triton.upsample import upsample_backward

        return upsample_backward(grad, ctx.factors).to(ctx.dtype), None, None, None


def _factors(x: Tensor, size: tuple[int, ...]) -> tuple[int, ...] | None:
    """Per-axis integer factors size / x's spatial size, or None when one is not a whole number."""
    factors = tuple(s // i for s, i in zip(size, x.shape[2:]))
    if any(f * i != s for f, s, i in zip(factors, size, x.shape[2:])):
        return None
    return factors


def _triton_unavailable(x: Tensor, factors: tuple[int, ...] | None) -> str | None:
    if factors is None:
        return "the sizes are not integer multiples of the input's"
    if max(factors) > MAX_FACTOR:
        return f"a factor above {MAX_FACTOR}"
    if not x.requires_grad or not torch.is_grad_enabled():
        return "no gradient needed (the forward is F.interpolate either way)"
    return triton_unavailable(x)


def upsample_linear(x: Tensor, size: tuple[int, ...] | list[int], backend: str | None = None) -> Tensor:
    """Bilinear (2D) / trilinear (3D) resize of x to ``size`` with ``align_corners=False``, as
    ``F.interpolate``; the Triton backend only changes how the input gradient is computed (no atomics).

    Args:
        x: (N, C, H, W) or (N, C, D, H, W), floating point, any layout.
        size: the output's spatial size (one int per spatial axis, >= 1).
        backend: None (automatic), ``"triton"`` or ``"reference"``.
    Returns:
        (N, C, *size), as ``F.interpolate`` returns it (dtype under autocast included).
    Raises:
        TypeError / ValueError naming the argument for a non-tensor, a non-float or wrongly shaped x, or a
        bad size; RuntimeError for a forced unavailable backend.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if x.ndim not in (4, 5):
        raise ValueError(f"x must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(x.shape)}")
    size = tuple(size)
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # inductor generates the backward itself; a traced size must reach F.interpolate untouched (export)
        return F.interpolate(x, size=size, mode=mode, align_corners=False)
    if len(size) != x.ndim - 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"size must be {x.ndim - 2} ints >= 1, got {size!r}")
    factors = _factors(x, size)
    chosen = choose_backend("upsample", backend, [("triton", lambda: _triton_unavailable(x, factors)),
                                                  ("reference", lambda: None)])
    if chosen == "triton":
        return _GatherBackward.apply(x, size, mode, factors)
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


__all__ = ["upsample_linear"]
