"""``conv1x1_add(acc, x, weight, bias)``: a running sum of 1x1 convolutions, ``acc + conv1x1(x, weight, bias)``.

The HR pathway's dense fusion (a 1x1 convolution over the concatenation of the projected input and every block's
output) is computed without the concatenation as such a running sum, one term per feature
(:class:`hmedn_fast.nn.lean.DenseFusionSum`). Backends:

- ``"triton"`` (:mod:`hmedn_fast.ops.triton.conv1x1`): one kernel forward (the product, the bias and the running
  sum in one pass, one rounding) and one backward (input, weight and bias gradients from one read of the output
  gradient and the input); the running sum's gradient is the output gradient itself (no copy). bf16 / fp16
  compute dtype (the inputs' dtype, or autocast's), channels innermost (channels-last tensors and channel slices
  of them), at most 64 input and output channels. The weight is rounded to the compute dtype inside the kernel
  (as autocast's cast would); its gradient is float32 sums of the exact products, in the weight's dtype.
- ``"reference"``: :func:`conv1x1_add_reference` (``F.conv*d`` + add), any device, dtype and layout.

The automatic choice is Triton for CUDA tensors it can take, outside ``torch.compile``; ``backend=`` or
``HMEDN_BACKEND_CONV1X1_ADD`` / ``HMEDN_BACKEND`` force one.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from hmedn_fast.ops.dispatch import choose_backend, triton_unavailable
from hmedn_fast.ops.grad_meet import GradMeet
from hmedn_fast.ops.strides import voxel_stride

TRITON_DTYPES = (torch.bfloat16, torch.float16)
MAX_TRITON_CHANNELS = 64
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def conv1x1_add_reference(acc: Tensor | None, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Plain-PyTorch truth of :func:`conv1x1_add` (same arguments, no ``backend``)."""
    term = _CONV[x.ndim](x, weight, bias)
    return term if acc is None else acc + term


def _check(acc: Tensor | None, x: Tensor, weight: Tensor, bias: Tensor | None, start: int | None = None) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if x.ndim not in _CONV:
        raise ValueError(f"x must be (N, C_in, *spatial) with 1 to 3 spatial dims, got shape {tuple(x.shape)}")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
        raise ValueError(f"start must be None or a non-negative int, got {start!r}")
    first = start or 0
    wide_enough = weight.ndim == x.ndim and (weight.shape[1] == x.shape[1] if start is None
                                             else weight.shape[1] >= first + x.shape[1])
    if not wide_enough or any(k != 1 for k in weight.shape[2:]):
        cin = x.shape[1] if start is None else f">= {first + x.shape[1]}"
        raise ValueError(f"weight must be (C_out, {cin}{', 1' * (x.ndim - 2)}) for x of shape {tuple(x.shape)}"
                         f"{'' if start is None else f' from input channel {start}'} (a 1x1 convolution, groups=1), "
                         f"got {tuple(weight.shape)}")
    out_shape = (x.shape[0], weight.shape[0], *x.shape[2:])
    for name, t, shape in (("bias", bias, (weight.shape[0],)), ("acc", acc, out_shape)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor or None, got {type(t).__name__}"
                            + (f" of dtype {t.dtype}" if isinstance(t, Tensor) else ""))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("acc", acc)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the convolution runs in: autocast's for x's device when autocast is on (as ``F.conv*d``), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def conv1x1_add(acc: Tensor | None, x: Tensor, weight: Tensor, bias: Tensor | None = None,
                backend: str | None = None, start: int | None = None,
                sink: WeightGradSink | None = None, meet: GradMeet | None = None) -> Tensor:
    """``acc + conv(x, weight, bias)`` for a 1x1 convolution (``acc`` None: the convolution alone), differentiable in
    every tensor argument; autocast applies to the convolution as it does to ``F.conv*d``.

    Args:
        acc: (N, C_out, *spatial) running sum or None.
        x: (N, C_in, *spatial), 1 to 3 spatial dims.
        weight: (C_out, C_in, 1, ...) (a slice of a wider convolution's weight is fine), or with ``start`` that wider
            weight (C_out, >= start + C_in, 1, ...), of which input channels ``start .. start + C_in`` are used.
        bias: (C_out,) or None.
        backend: None (automatic), "triton" or "reference".
        start: None, or the first input channel of ``weight`` that x's channels meet.
        sink: None, or the :class:`WeightGradSink` of ``weight`` shared by the terms of one running sum (each with its
            ``start``): on the Triton backend every term's weight gradient goes into it and only the term at
            ``start`` 0 hands the whole gradient to autograd (no per-term full-size gradients to add up).
        meet: None, or a :class:`~hmedn_fast.ops.grad_meet.GradMeet` for x's gradient shared with one other
            backward (the Triton backward then adds its input gradient into the other's in its kernel, or leaves its
            own there); taken only on the Triton backend for an x already in the compute dtype.

    Returns:
        (N, C_out, *spatial): on the Triton backend channels-last in the compute dtype (bf16 / fp16); on the
        reference as ``acc + F.conv*d(x, weight, bias)``.

    Raises:
        TypeError / ValueError naming the bad argument; RuntimeError when a forced backend cannot run the call.
    """
    _check(acc, x, weight, bias, start)
    if sink is not None and (start is None or not isinstance(sink, WeightGradSink) or sink.weight is not weight):
        raise ValueError("sink must be the WeightGradSink of this weight, given together with start")
    dtype = compute_dtype(x)
    xc = x if x.dtype == dtype else x.to(dtype)
    first = start or 0
    w = weight if start is None else weight[:, first:first + x.shape[1]]
    if choose(acc, xc, w, dtype, backend) == "reference":
        return conv1x1_add_reference(acc, x, w, bias)
    meet = meet if xc is x and x.requires_grad else None
    if sink is None:
        return _Conv1x1AddTriton.apply(acc, xc, w, bias, None, 0, meet)
    return _Conv1x1AddTriton.apply(acc, xc, weight, bias, sink, first, meet)


class WeightGradSink:
    """The weight gradient of a running sum of 1x1 convolutions whose terms use input-channel slices of one wider
    weight (:class:`hmedn_fast.nn.lean.DenseFusionSum`), gathered in one tensor: each term's backward writes its
    slice, and the term at input channel 0, whose backward runs last (every later term's output flows into its
    running sum), returns the whole. Autograd would otherwise give each term a full-size gradient of zeros with its
    slice filled in and add them all up (three small kernels a term).

    Args:
        weight: the shared (C_out, C_in_total, 1, ...) weight.
    """

    def __init__(self, weight: Tensor) -> None:
        self.weight, self._grad = weight, None

    def put(self, start: int, grad: Tensor) -> Tensor | None:
        """Store ``grad`` ((C_out, C_in) float32) as the gradient of input channels ``start .. start + C_in``; at
        ``start`` 0 return the whole gradient (weight's dtype and layout) and start over, else None."""
        if self._grad is None:
            self._grad = torch.empty_like(self.weight)
        piece = self._grad[:, start:start + grad.shape[1]]
        piece.copy_(grad.reshape(piece.shape))
        if start:
            return None
        whole, self._grad = self._grad, None
        return whole


def choose(acc: Tensor | None, x: Tensor, weight: Tensor, dtype: torch.dtype, backend: str | None = None) -> str:
    """The backend :func:`conv1x1_add` runs (x already in the compute ``dtype``): ``backend`` or the environment's
    if forced (checked to be able to run the call), else Triton for CUDA tensors it takes outside
    ``torch.compile``, else the reference."""
    candidates = [("reference", lambda: None), ("triton", lambda: _triton_unavailable(acc, x, weight, dtype))]
    if x.is_cuda and not torch.compiler.is_compiling():
        candidates.reverse()
    return choose_backend("conv1x1_add", backend, candidates)


def _triton_unavailable(acc: Tensor | None, x: Tensor, weight: Tensor, dtype: torch.dtype) -> str | None:
    reason = triton_unavailable(x, acc, weight)
    if reason is not None:
        return reason
    if x.numel() == 0 or weight.shape[0] == 0:
        return "empty tensors (nothing to launch)"
    if dtype not in TRITON_DTYPES:
        return f"compute dtype {dtype} is not one of {TRITON_DTYPES}"
    if acc is not None and acc.dtype != dtype:
        return f"acc's dtype {acc.dtype} differs from the compute dtype {dtype}"
    tensors = [(t, voxel_stride(t)) for t in (x, acc) if t is not None]
    if any(vs is None for _, vs in tensors):
        return "x and acc need channels innermost with the voxels at one stride (channels-last, or channel slices)"
    if max(weight.shape[:2]) > MAX_TRITON_CHANNELS:
        return f"more than {MAX_TRITON_CHANNELS} input or output channels"
    if not all(offsets_fit_int32(t, vs) for t, vs in tensors) \
            or x.shape[0] * weight.shape[0] * x[0, 0].numel() >= 2 ** 31:
        return "element offsets of 2^31 or more (the kernels index with int32)"
    return None


def offsets_fit_int32(t: Tensor, voxel_stride: int) -> bool:
    """Whether every element offset of an (N, C, *spatial) tensor with channels innermost and its voxels at
    ``voxel_stride`` is below 2^31: the last voxel's row start plus its channels."""
    voxels = t.numel() // max(t.shape[1], 1)
    return (voxels - 1) * voxel_stride + t.shape[1] < 2 ** 31


class _Conv1x1AddTriton(torch.autograd.Function):
    """One Triton launch forward, one backward (+ a sum of the weight-gradient partials); saves x and the weight the
    term uses. With a sink, ``weight`` is the wide weight and the term uses input channels ``start ..``; with a meet,
    x's gradient is shared with another backward (:class:`~hmedn_fast.ops.grad_meet.GradMeet`)."""

    @staticmethod
    def forward(ctx, acc, x, weight, bias, sink, start, meet):
        from hmedn_fast.ops.triton import conv1x1 as kernels
        w = weight if sink is None else weight[:, start:start + x.shape[1]]
        out = kernels.forward(acc, x, voxel_stride(x), 0 if acc is None else voxel_stride(acc), w, bias)
        ctx.save_for_backward(x, w)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.sink, ctx.start, ctx.meet = sink, start, meet
        if meet is not None:
            meet.join()
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        from hmedn_fast.ops.triton import conv1x1 as kernels
        x, w = ctx.saved_tensors
        sink, start = ctx.sink, ctx.start
        need_acc, need_x, need_w, need_b = ctx.needs_input_grad[:4]
        gs = voxel_stride(g)
        if g.dtype != x.dtype or gs is None:
            g = g.to(x.dtype).movedim(1, -1).contiguous().movedim(-1, 1)
            gs = voxel_stride(g)
        meet = ctx.meet if need_x and ctx.meet is not None and ctx.meet.met else None
        other = None if meet is None else meet.take()
        into = other if other is not None and kernels.dense_like_dx(other, x) else None
        dx, dw, db = kernels.backward(g, gs, x, voxel_stride(x), w, need_x, need_w, need_b, add_to=into)
        if meet is not None and other is None:  # the other backward has not run: it adds ours
            meet.leave(dx)
            dx = None
        elif other is not None and into is None:
            dx = dx.add_(other)
        if dw is not None:
            dw = dw.reshape(w.shape).to(w.dtype) if sink is None else sink.put(start, dw)
        db = None if db is None else db.to(ctx.bias_dtype)
        return g if need_acc else None, dx, dw, db, None, None, None
