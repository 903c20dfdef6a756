"""Fused ``norm (+ residual) + ReLU``: the memory-bound glue around the HR pathway's convolutions.

``norm_act(x, weight, bias, kind=...)`` computes ``relu(norm(x) (+ residual))`` for BatchNorm, InstanceNorm and
GroupNorm with the semantics of ``F.batch_norm`` / ``F.instance_norm`` / ``F.group_norm`` (batch statistics
when ``training``, updating ``running_mean`` / ``running_var`` in place when given; the running statistics
otherwise). Backends:

- ``"triton"``: :mod:`hmedn_fast.ops.triton.norm`, 3 kernel launches forward (chunk statistics, per-set
  statistics and coefficients with the running-statistics update, apply; 2 with running statistics) and 3
  backward (chunk gradient sums, per-set gradient coefficients and weight / bias gradients, apply), no other
  torch op than allocating their outputs; nothing stored but the input (and the residual, already alive) and
  (N or 1, 4, C) coefficients. CUDA, or CPU with ``TRITON_INTERPRET=1``; float32 / bfloat16 / float16, NC* or
  channels-last. Statistics are float32: per-chunk mean and sum of squared deviations (shifted by a sample of
  the chunk) combined with Chan's parallel formula, so a large mean against the spread costs no precision.
- ``"reference"``: :func:`norm_act_reference`, plain PyTorch, any device and dtype.

``backend=`` or ``HMEDN_BACKEND_NORM_ACT`` / ``HMEDN_BACKEND`` force one. The automatic choice is Triton for
training-mode BatchNorm of large channels-last 3D CUDA tensors with autograd on (:func:`prefers_triton`), where
PyTorch has no channels-last 3D BatchNorm kernel and falls back to a generic Welford reduction plus separate
normalise and ReLU passes; the reference everywhere else (cuDNN / native kernels, and the only choice under
``torch.compile``, whose inductor fuses it).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from hmedn_fast.ops.dispatch import choose_backend, triton_unavailable
from hmedn_fast.ops.strides import flat_spatial_stride

KINDS = ("batch", "instance", "group")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_MIN_ELEMENTS = 2 ** 22  # automatic choice: below this the reference's fewer launches win (measured)


def prefers_triton(x: Tensor, kind: str, training: bool) -> bool:
    """True where the automatic backend of :func:`norm_act` is Triton: a training-mode (batch statistics)
    BatchNorm of a 3D CUDA tensor laid out channels-last (``torch.channels_last_3d``, or a channel slice of
    one) with at least ``TRITON_MIN_ELEMENTS`` elements, autograd on, outside ``torch.compile``."""
    return (kind == "batch" and training and x.is_cuda and x.ndim == 5 and x.numel() >= TRITON_MIN_ELEMENTS
            and channels_innermost(x) and torch.is_grad_enabled() and not torch.compiler.is_compiling())


def channels_innermost(x: Tensor) -> bool:
    """(N, C, *spatial) with more than one channel, channel stride 1 and the spatial axes flattening to one
    stride of at least C: ``channels_last`` / ``channels_last_3d`` tensors and channel slices of them."""
    if x.shape[1] < 2 or x.stride(1) != 1:
        return False
    s = flat_spatial_stride(x, 2)
    return s is not None and s >= x.shape[1]


def norm_act_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, kind: str = "batch",
                       num_groups: int = 1, eps: float = 1e-5, residual: Tensor | None = None, relu: bool = True,
                       running_mean: Tensor | None = None, running_var: Tensor | None = None,
                       momentum: float = 0.1, training: bool = True) -> Tensor:
    """Plain-PyTorch truth of :func:`norm_act` (same arguments, no ``backend``)."""
    if kind == "batch":
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    elif kind == "instance":
        y = F.instance_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def _check(x: Tensor, weight: Tensor | None, bias: Tensor | None, kind: str, num_groups: int,
           residual: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None, training: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 3:
        raise ValueError(f"x must be (N, C, *spatial) with at least one spatial dim, got shape {tuple(x.shape)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},) for x with {c} channels, got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if kind == "group" and (isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1
                            or c % num_groups):
        raise ValueError(f"num_groups must be a positive int dividing the {c} channels, got {num_groups!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None and kind != "group":
        raise ValueError("running_mean and running_var are required when training=False")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    per_channel = math.prod(x.shape[2:]) * (x.shape[0] if kind == "batch" else 1)
    if training and kind != "group" and per_channel < 2:
        raise ValueError(f"x must have more than 1 value per channel when training, got shape {tuple(x.shape)}")


def norm_act(x: Tensor, weight: Tensor | None, bias: Tensor | None, kind: str = "batch", num_groups: int = 1,
             eps: float = 1e-5, residual: Tensor | None = None, relu: bool = True,
             running_mean: Tensor | None = None, running_var: Tensor | None = None, momentum: float = 0.1,
             training: bool = True, backend: str | None = None) -> Tensor:
    """``relu(norm(x) (+ residual))``, differentiable in x, weight, bias and residual.

    Args:
        x: (N, C, *spatial) float (float32 / bfloat16 / float16 on the Triton backend).
        weight, bias: (C,) affine parameters or None.
        kind: "batch" | "instance" | "group".
        num_groups: groups of "group".
        eps: added to the variance.
        residual: (N, C, *spatial) added after the affine transform, before the ReLU, or None.
        relu: apply the ReLU.
        running_mean, running_var: (C,) running statistics ("batch" / "instance"; both or neither), updated
            in place with ``momentum`` when ``training`` (unbiased variance, averaged over N for "instance",
            as PyTorch).
        momentum: running-statistics momentum.
        training: use batch (input) statistics; False uses the running ones (never for "group").
        backend: None (automatic, see :func:`prefers_triton`), "triton" or "reference".

    Returns:
        (N, C, *spatial) in x's dtype promoted with the residual's (as ``x + residual``), and x's memory layout
        on the Triton backend.

    Raises:
        TypeError / ValueError on bad inputs (named), RuntimeError when a forced backend is unavailable.
    """
    _check(x, weight, bias, kind, num_groups, residual, running_mean, running_var, training)
    if choose(x, kind, training, backend) == "reference":
        return norm_act_reference(x, weight, bias, kind, num_groups, eps, residual, relu, running_mean,
                                  running_var, momentum, training)
    return _NormActTriton.apply(x, weight, bias, residual, kind, num_groups, eps, relu, running_mean, running_var,
                                momentum, training)


def choose(x: Tensor, kind: str, training: bool, backend: str | None = None,
           prefer_triton: bool | None = None) -> str:
    """The backend :func:`norm_act` runs for these arguments: ``backend`` or the environment's if forced
    (checked to be able to run them), else Triton where it can run and is preferred (``prefer_triton``, by
    default :func:`prefers_triton`), else the reference."""
    candidates = [("reference", lambda: None), ("triton", lambda: _triton_unavailable(x, kind))]
    if prefers_triton(x, kind, training) if prefer_triton is None else prefer_triton:
        candidates.reverse()
    return choose_backend("norm_act", backend, candidates)


def _triton_unavailable(x: Tensor, kind: str) -> str | None:
    reason = triton_unavailable(x)
    if reason is not None:
        return reason
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype} is not one of {TRITON_DTYPES}"
    if x.numel() >= 2 ** 31:
        return "tensors of 2^31 or more elements (the kernels index with int32)"
    if kind == "group" and torch.is_autocast_enabled(x.device.type):
        return "group norm under autocast returns float32 (autocast's rule): served by the reference"
    return None


class _NormActTriton(torch.autograd.Function):
    """Triton forward / backward (3 launches each); saves x, residual, weight and the (NS, 4, C) coefficients."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, kind, groups, eps, relu, running_mean, running_var, momentum,
                training):
        from hmedn_fast.ops.triton import norm as kernels
        x, xs = kernels.flat(x)
        residual, rs = kernels.flat(residual) if residual is not None else (None, None)
        batch_stats = training or kind == "group"
        geo = kernels.geometry(tuple(x.shape), xs, rs, kind, groups, batch_stats)
        update = training and running_mean is not None and kind != "group"
        y, coef = kernels.forward(geo, x, residual, weight, bias, running_mean, running_var, eps, momentum, relu,
                                  batch_stats, update)
        ctx.save_for_backward(x, residual, weight, coef)
        ctx.opts = (geo, relu, batch_stats, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from hmedn_fast.ops.triton import norm as kernels
        x, residual, weight, coef = ctx.saved_tensors
        geo, relu, batch_stats, bias_dtype = ctx.opts
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        dx, dw, db, dr = kernels.backward(geo, x, residual, dy, weight, coef, relu, batch_stats, need_w,
                                          bias_dtype if need_b else None, need_r)
        return (dx if need_x else None, dw, db, dr, None, None, None, None, None, None, None, None)
