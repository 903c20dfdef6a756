"""Fused ``norm (+ residual) + ReLU``: the memory-bound glue around the HR pathway's convolutions.

``norm_act(x, weight, bias, kind=...)`` computes ``relu(norm(x) (+ residual))`` for BatchNorm, InstanceNorm and
GroupNorm with the semantics of ``F.batch_norm`` / ``F.instance_norm`` / ``F.group_norm`` (batch statistics
when ``training``, updating ``running_mean`` / ``running_var`` in place when given; the running statistics
otherwise). Backends, in order of preference:

- ``"triton"``: :mod:`hmedn_fast.ops.triton.norm`, 2 passes forward (statistics, apply) and 2 backward
  (per-channel gradient sums, apply), nothing stored but the input (and the residual, already alive). CUDA,
  or CPU with ``TRITON_INTERPRET=1``; float32 / bfloat16 / float16, NC* or channels-last.
- ``"reference"``: :func:`norm_act_reference`, plain PyTorch, any device and dtype.

``backend=`` or ``HMEDN_BACKEND_NORM_ACT`` / ``HMEDN_BACKEND`` force one. Statistics of the Triton backend are
float32 sums of x and x^2 (combined in float64): exact enough for conv outputs, whose mean is small against
their spread; the variance loses precision when ``|mean| >> std``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from hmedn_fast.ops.dispatch import choose_backend, triton_unavailable

KINDS = ("batch", "instance", "group")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
    if not training and (running_mean is None or running_var is None) and kind != "group":
        raise ValueError("running_mean and running_var are required when training=False")


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
        running_mean, running_var: (C,) float32 running statistics ("batch" / "instance"), updated in place
            with ``momentum`` when ``training`` (unbiased variance, as PyTorch).
        momentum: running-statistics momentum.
        training: use batch (input) statistics; False uses the running ones (never for "group").
        backend: None (automatic: "reference", the faster one measured so far), "triton" or "reference".

    Returns:
        (N, C, *spatial) in x's dtype (and memory layout on the Triton backend).

    Raises:
        TypeError / ValueError on bad inputs (named), RuntimeError when a forced backend is unavailable.
    """
    _check(x, weight, bias, kind, num_groups, residual, running_mean, running_var, training)
    # Automatic choice: the PyTorch reference (cuDNN norm + add + ReLU). The Triton op is opt-in
    # (backend="triton" or HMEDN_BACKEND_NORM_ACT=triton) until it wins: on the H200 it took 2.15 ms per
    # forward+backward of the 3D pathway's norm against the reference's 0.42 ms, host overhead dominating
    # (benchmarks/results/blocks_H200.json, "norm_act").
    chosen = choose_backend("norm_act", backend, [
        ("reference", lambda: None),
        ("triton", lambda: _triton_unavailable(x, kind, running_mean, training)),
    ])
    if chosen == "reference":
        return norm_act_reference(x, weight, bias, kind, num_groups, eps, residual, relu, running_mean,
                                  running_var, momentum, training)
    return _NormActTriton.apply(x, weight, bias, residual, kind, num_groups, eps, relu, running_mean, running_var,
                                momentum, training)


def _triton_unavailable(x: Tensor, kind: str, running_mean: Tensor | None, training: bool) -> str | None:
    reason = triton_unavailable(x)
    if reason is not None:
        return reason
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype} is not one of {TRITON_DTYPES}"
    if kind == "instance" and running_mean is not None:
        return "instance norm with running statistics is served by the reference only"
    if kind == "group" and torch.is_autocast_enabled(x.device.type):
        return "group norm under autocast returns float32 (autocast's rule): served by the reference"
    return None


def _layout(t: Tensor | None) -> Tensor | None:
    """t itself when its spatial axes flatten to one stride, else an NC*-contiguous copy."""
    from hmedn_fast.ops.triton.norm import ncs_strides
    if t is None or ncs_strides(t) is not None:
        return t
    return t.contiguous()


def _statistics(s1: Tensor, s2: Tensor, kind: str, groups: int, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-(n, c) float64 mean and variance (biased) and the sample count behind each, from (N, C) sums."""
    n, c = s1.shape
    s1, s2 = s1.double(), s2.double()
    if kind == "batch":
        s1, s2, count = s1.sum(0, keepdim=True).expand(n, c), s2.sum(0, keepdim=True).expand(n, c), count * n
    elif kind == "group":
        s1 = s1.view(n, groups, -1).sum(2, keepdim=True).expand(n, groups, c // groups).reshape(n, c)
        s2 = s2.view(n, groups, -1).sum(2, keepdim=True).expand(n, groups, c // groups).reshape(n, c)
        count = count * (c // groups)
    mean = s1 / count
    return mean, (s2 / count - mean * mean).clamp_min(0.0), count


def _group_mean(t: Tensor, kind: str, groups: int) -> Tensor:
    """Mean of an (N, C) tensor over each element's statistics set's (n, c) pairs, broadcast back."""
    n, c = t.shape
    if kind == "batch":
        return t.mean(0, keepdim=True).expand(n, c)
    if kind == "group":
        return t.view(n, groups, -1).mean(2, keepdim=True).expand(n, groups, c // groups).reshape(n, c)
    return t


class _NormActTriton(torch.autograd.Function):
    """Triton forward/backward; saves x, residual and per-(n, c) coefficients only."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, kind, groups, eps, relu, running_mean, running_var, momentum,
                training):
        from hmedn_fast.ops.triton import norm as kernels
        x, residual = _layout(x), _layout(residual)
        n, c = x.shape[:2]
        count = x[0, 0].numel()
        gamma = weight.double() if weight is not None else torch.ones(c, dtype=torch.float64, device=x.device)
        beta = bias.double() if bias is not None else torch.zeros(c, dtype=torch.float64, device=x.device)
        use_batch = training or kind == "group"
        if use_batch:
            s1, s2 = kernels.reduce_nc(x)
            mean, var, m = _statistics(s1, s2, kind, groups, count)
            if running_mean is not None and training:
                with torch.no_grad():
                    per_set = mean if kind == "instance" else mean[:1]
                    per_var = var if kind == "instance" else var[:1]
                    unbiased = per_var * m / max(m - 1, 1)
                    running_mean.lerp_(per_set.mean(0).to(running_mean.dtype), momentum)
                    running_var.lerp_(unbiased.mean(0).to(running_var.dtype), momentum)
        else:
            mean = running_mean.double().expand(n, c)
            var = running_var.double().expand(n, c)
        rstd = torch.rsqrt(var + eps)
        a = rstd * gamma
        b = beta - mean * a
        a32, b32 = a.float().contiguous(), b.float().contiguous()
        y = kernels.apply_forward(x, a32, b32, residual, relu)
        ctx.save_for_backward(x, residual, weight, mean, rstd, a32, b32)
        ctx.opts = (kind, groups, relu, use_batch, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from hmedn_fast.ops.triton import norm as kernels
        x, residual, weight, mean, rstd, a32, b32 = ctx.saved_tensors
        kind, groups, relu, use_batch, bias_dtype = ctx.opts
        dy = _layout(dy)
        n, c = x.shape[:2]
        gamma = weight.double() if weight is not None else torch.ones(c, dtype=torch.float64, device=x.device)
        sg, sgx = kernels.reduce_nc(x, residual, dy, a32, b32, relu)
        sg, sgx = sg.double(), sgx.double()
        sgxhat = rstd * (sgx - mean * sg)  # per-(n, c) sum of g * xhat
        ga = rstd * gamma
        if use_batch:  # dx = rstd (h - mean_R(h) - xhat mean_R(h xhat)), h = gamma g, R = the statistics set
            count = x[0, 0].numel()
            mh = _group_mean(gamma * sg, kind, groups) / count
            mhx = _group_mean(gamma * sgxhat, kind, groups) / count
            gb = -rstd * rstd * mhx
            gd = -rstd * mh + rstd * rstd * mhx * mean
        else:
            gb = gd = torch.zeros_like(ga)
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        dx, dr = kernels.apply_backward(x, residual, dy, a32, b32, ga.expand(n, c).float().contiguous(),
                                        gb.expand(n, c).float().contiguous(), gd.expand(n, c).float().contiguous(),
                                        relu, bool(need_r))
        dw = sgxhat.sum(0).to(weight.dtype) if need_w else None
        db = sg.sum(0).to(bias_dtype) if need_b and bias_dtype is not None else None
        return (dx if need_x else None, dw, db, dr, None, None, None, None, None, None, None, None)
