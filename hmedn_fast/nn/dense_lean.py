"""Memory-lean dense block: one shared feature buffer, norm + ReLU recomputed in backward (the memory-efficient
DenseNet scheme of Pleiss et al., 2017).

Eager :class:`~hmedn_fast.nn.blocks.DenseBlock` concatenates for every layer: layer i's input
``cat(x, f_1, ..., f_{i-1})`` (c_i channels) is a new tensor, autograd keeps it and its BatchNorm + ReLU output
for backward, and the block output is one more concatenation; in backward every feature's gradient is a sum
over the concatenations that used it. That is O(n^2) channel copies and saved channels per block.

:class:`LeanDenseBlock` writes x and each layer's g new channels once into one (N, C_out, *spatial) buffer, the
block output, in x's layout. Layer i normalises the channel slice ``buffer[:, :c_i]`` in place of a
concatenation (the Triton norm reads the slice, ATen's BatchNorm takes it as it is) and its convolution writes
its g channels into the buffer (the Triton convolution directly, measured as fast as into a tensor of its own; others
through a copy). Saved: the buffer and each norm's statistics (C floats). On CUDA the norms run on
the fused Triton kernels whatever their size.

The backward replays each norm + ReLU from the buffer with the saved statistics (no reduction), runs the
convolution and norm backward kernels directly, and accumulates input gradients into slices of one gradient
buffer: the incoming gradient itself when nothing else can see it (:mod:`hmedn_fast.nn.grad_reuse`), else a copy. A
layer's output gradient is a dense copy of that buffer's channel slice (the Triton convolution kernels read it faster:
hmedn_3d_l2's lean + graph step took 46.6 ms reading every slice in place against 45.4 with copies, H200, two calls
whose DynUNet control agreed: ``benchmarks/results/train_stages_ab_nvidia_h200_s25{b,a}.json``), except in a block
with ``group_channels`` set (memory first): there the slice is read in place (ATen copies what it needs).
With the Triton norm (which recomputes the ReLU mask itself) a layer's replayed activation is freed after its
weight gradient, before the input gradient of the same size is allocated, and each layer's temporaries are dropped
before the next layer replays its own: the widest layer's tensors never add to the backward's peak. BatchNorm
layers only (the default norm); other norms, and convolutions with a bias, run the eager block. Autocast is replayed
as the forward ran it. Differentiable once.

``block.group_channels`` (:class:`~hmedn_fast.nn.blocks.DenseBlock`; None by default) caps how many input channels
of a layer the backward takes at once: it replays and differentiates each group (BatchNorm is per channel, and a
convolution's weight and input gradients split along its input channels: the same results), so the backward's
temporaries are group-wide. The forward takes whole layer inputs (its peak is below the grouped backward's).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..device import channels_last_format, memory_format_of
from ..ops.conv import conv_input_grad
from ..ops.copy import copy_channels_
from ..ops.norm_act import choose
from . import grad_reuse
from .lean import (_batch_norm, _batch_norm_backward, _conv, _conv_backward, _variance, is_batch_norm, norm_call,
                   norm_kernels, supports, triton_norm_forward)


def supported(block: nn.Module) -> bool:
    """True when every layer of the dense block is BatchNorm -> ReLU -> bias-free convolution (not
    SyncBatchNorm: its statistics span processes, which the lean block's local statistics would not)."""
    return all(supports(layer.norm) and is_batch_norm(layer.norm) and layer.conv.bias is None
               for layer in block.layers)


class _AtenNorm:
    """BatchNorm + ReLU through ATen's kernels (any device and dtype), on a dense copy of the buffer's channel
    slice (temporary, not saved): ATen's CUDA BatchNorm backward on a strided slice of a channels-last tensor
    falls to a generic kernel, 6x slower than the whole eager block and off by up to 8e-3 of the input gradient's
    range in float32 (measured on the H200)."""

    needs_activation = True  # the backward takes the ReLU mask from the replayed activation

    def __init__(self, inp: Tensor, norm: nn.Module) -> None:
        call = norm_call(norm, update=True)
        out, self.mean, self.invstd = _batch_norm(self.prepare(inp), norm.weight, norm.bias, call)
        self.a = torch.relu_(out)
        self.train, self.eps = call["training"], call["eps"]

    @staticmethod
    def prepare(inp: Tensor) -> Tensor:
        """The slice as this engine reads it: a dense copy (once per layer and pass)."""
        return inp.contiguous(memory_format=channels_last_format(inp.ndim - 2) if inp.stride(1) == 1
                              else torch.contiguous_format)

    def replay(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        out = torch.ops.aten.native_batch_norm(x, weight, bias, self.mean, _variance(self.invstd, self.eps), False,
                                               0.0, self.eps)[0]
        return torch.relu_(out)

    def backward(self, ga: Tensor, x: Tensor, a: Tensor, weight: Tensor | None, need_w: bool, need_b: bool,
                 gx: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Adds the input gradient to ``gx``; returns the weight and bias gradients."""
        gn = torch.ops.aten.threshold_backward(ga, a, 0)
        ginp, gw, gb = _batch_norm_backward(gn, x, weight, self.mean, self.invstd, self.train, self.eps,
                                            [True, need_w, need_b])
        gx.add_(ginp.to(gx.dtype))
        return gw, gb

    def saved(self) -> tuple[Tensor, ...]:
        return self.mean, self.invstd

    def group(self, g0: int, g1: int, x: Tensor) -> "_AtenNorm":
        """This engine restricted to channels ``[g0, g1)`` (BatchNorm is per channel: the same results)."""
        e = object.__new__(_AtenNorm)
        e.mean, e.invstd, e.train, e.eps, e.a = self.mean[g0:g1], self.invstd[g0:g1], self.train, self.eps, None
        return e


class _TritonNorm:
    """BatchNorm + ReLU through the fused Triton kernels (:mod:`hmedn_fast.ops.triton.norm`), which read the
    buffer's channel slice in place."""

    needs_activation = False  # the backward recomputes the ReLU mask from the input and the coefficients

    def __init__(self, inp: Tensor, norm: nn.Module) -> None:
        self.kernels = norm_kernels()
        call = norm_call(norm, update=True)
        self.batch_stats = call["training"]
        self.a, self.coef, self.geo = triton_norm_forward(inp, None, norm.weight, norm.bias, call)

    def prepare(self, inp: Tensor) -> Tensor:
        """The slice as the kernels read it (itself: its spatial axes flatten to one stride)."""
        return self.kernels.flat(inp)[0]

    def replay(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return self.kernels.apply(self.geo, x, None, self.coef, True)

    def backward(self, ga: Tensor, x: Tensor, a: Tensor | None, weight: Tensor | None, need_w: bool, need_b: bool,
                 gx: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Adds the input gradient to ``gx`` inside the kernel (float32 sum, one rounding; no dx tensor)."""
        _, dw, db, _ = self.kernels.backward(self.geo, x, None, ga, weight, self.coef, True, self.batch_stats,
                                             need_w, weight.dtype if need_b else None, False, accumulate=gx)
        return dw, db

    def saved(self) -> tuple[Tensor, ...]:
        return (self.coef,)

    def group(self, g0: int, g1: int, x: Tensor) -> "_TritonNorm":
        """This engine restricted to channels ``[g0, g1)``, whose slice of the buffer is ``x``."""
        e = object.__new__(_TritonNorm)
        e.kernels, e.batch_stats, e.a = self.kernels, self.batch_stats, None
        e.coef = self.coef[:, :, g0:g1].contiguous()
        x, xs = e.kernels.flat(x)
        e.geo = e.kernels.geometry(tuple(x.shape), xs, None, "batch", 1, self.batch_stats)
        return e


class _IntoBuffer(torch.autograd.Function):
    """``torch.cat(parts, 1)`` written into the first channels of a new (N, C_out, *spatial) buffer for
    :class:`LeanDenseBlock` to fill (its other channels uninitialised): a block input made of parts (the decoder's
    upsampled features and skip) is never concatenated into a tensor of its own. Inputs: C_out, the buffer's dtype
    and memory format, the parts. Backward: each part's gradient as a dense copy of its channels (a view would keep
    the whole gradient buffer alive for as long as the part's gradient waits to be accumulated)."""

    @staticmethod
    def forward(ctx, channels: int, dtype: torch.dtype, fmt: torch.memory_format, *parts: Tensor) -> Tensor:
        x = parts[0]
        out = torch.empty((x.shape[0], channels, *x.shape[2:]), device=x.device, dtype=dtype, memory_format=fmt)
        ctx.ranges, c = [], 0
        for part in parts:
            copy_channels_(out[:, c:c + part.shape[1]], part)
            ctx.ranges.append((c, c + part.shape[1], part.dtype, memory_format_of(part)))
            c += part.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None, None, None, *(_dense(grad[:, a:b], dtype, fmt) for a, b, dtype, fmt in ctx.ranges))


class LeanDenseBlock(torch.autograd.Function):
    """Dense block forward + backward over one shared buffer (module doc). Inputs: the buffer (N, C_out, *spatial)
    from :func:`lean_dense_buffer`, whose first C_in channels hold the block input, the
    :class:`~hmedn_fast.nn.blocks.DenseBlock`, then per layer its norm weight, norm bias (None without affine)
    and conv weight. The buffer is filled in place and returned: (N, C_out = C_in + n g, *spatial), equal to the
    eager block's output, in the input's layout and in the dtype ``torch.cat`` would give (the input's promoted
    with the convolutions' output dtype). The buffer's gradient is returned whole: :class:`_IntoBuffer` reads its
    first C_in channels."""

    @staticmethod
    def forward(ctx, out: Tensor, block: nn.Module, *params: Tensor | None) -> Tensor:
        layers, dev = block.layers, out.device.type
        grad_reuse.prepare()
        ctx.mark_dirty(out)
        autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        fmt = memory_format_of(out)
        engines, c = [], block.in_channels
        for layer in layers:
            inp = out[:, :c]
            training = layer.norm.training or layer.norm.running_mean is None
            # Triton wherever it runs (CUDA): it reads the slice in place and costs the eager block's launches
            engine = (_TritonNorm if choose(inp, "batch", training, prefer_triton=inp.is_cuda) == "triton"
                      else _AtenNorm)(inp, layer.norm)
            g = layer.conv.out_channels
            _conv(engine.a, layer.conv.weight, layer.conv, out=out[:, c:c + g])  # the Triton kernel writes in place
            engine.a = None  # recomputed in backward
            engines.append(engine)
            c += g
        ctx.block, ctx.engines, ctx.autocast, ctx.fmt = block, engines, autocast, fmt
        ctx.save_for_backward(out, *params, *(t for e in engines for t in e.saved()))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout: Tensor):
        out, *rest = ctx.saved_tensors
        layers, engines = ctx.block.layers, ctx.engines
        params = rest[:3 * len(layers)]
        need = ctx.needs_input_grad
        dev, autocast_on, autocast_dtype = ctx.autocast
        if grad_reuse.exclusive(gout, out.dtype, ctx.fmt):  # nobody else sees it: accumulate in place
            gbuf = gout.detach()
        else:
            gbuf = gout.to(dtype=out.dtype, memory_format=ctx.fmt, copy=True)  # one copy, whatever the dtypes
        grads: list[Tensor | None] = [None] * len(params)
        limit = ctx.block.group_channels
        c = out.shape[1]
        for i in reversed(range(len(layers))):
            layer, engine = layers[i], engines[i]
            g = layer.conv.out_channels
            c -= g
            weight, bias, conv_weight = params[3 * i:3 * i + 3]
            need_w = need[2 + 3 * i] and weight is not None
            need_b = need[3 + 3 * i] and bias is not None
            gf = gbuf[:, c:c + g]
            compute_dtype = autocast_dtype if autocast_on else conv_weight.dtype
            if gf.dtype != compute_dtype or limit is None:  # a dense copy: the kernels read it faster than the slice
                gf = _dense(gf, compute_dtype, ctx.fmt)
            parts = []
            for g0, g1 in _channel_groups(c, limit):
                whole = g1 - g0 == c
                eng = engine if whole else engine.group(g0, g1, out[:, g0:g1])
                w_g, b_g, cw_g = _params(weight, bias, conv_weight, g0, g1, whole)
                parts.append(_layer_backward(eng, out[:, g0:g1], gf, w_g, b_g, cw_g, layer.conv, need[4 + 3 * i],
                                             need_w, need_b, gbuf[:, g0:g1], ctx.autocast))
                # each group's temporaries (replayed activation, input gradient: g1 - g0 channels) are gone before
                # the next group's; the layer's are gone before the next (narrower) layer's
            gf = None
            gnw, gnb, gw = _joined([p[0] for p in parts], 0), _joined([p[1] for p in parts], 0), _joined(
                [p[2] for p in parts], 1)
            grads[3 * i:3 * i + 3] = [gnw if need_w else None, gnb if need_b else None, gw]
        return (gbuf if need[0] else None, None, *grads)


def _layer_backward(engine, x: Tensor, gf: Tensor, weight: Tensor | None, bias: Tensor | None, conv_weight: Tensor,
                    conv: nn.Module, need_cw: bool, need_w: bool, need_b: bool, gx: Tensor,
                    autocast: tuple) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One layer's backward over the buffer channels ``x`` (all of its input, or a group of them with the engine,
    norm parameters and convolution weight columns restricted to it): replays norm + ReLU, adds the input gradient
    to ``gx``; returns the norm weight, norm bias and convolution weight gradients (None where not needed)."""
    dev, autocast_on, autocast_dtype = autocast
    inp = engine.prepare(x)
    with torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_on):
        a = engine.replay(inp, weight, bias)
    a_dtype = a.dtype
    if engine.needs_activation:
        ga, gw = _conv_backward(gf, a, conv_weight, conv, True, need_cw)
    else:  # weight gradient first, then the activation is freed before the input gradient is allocated
        _, gw = _conv_backward(gf, a, conv_weight, conv, False, need_cw)
        a = None
        ga = conv_input_grad(gf, conv_weight, inp.shape, conv.stride, conv.padding, conv.dilation, conv.groups)
    gnw, gnb = engine.backward(ga.to(a_dtype), inp, a, weight, need_w, need_b, gx)
    return gnw if need_w else None, gnb if need_b else None, gw


def _channel_groups(c: int, limit: int | None) -> list[tuple[int, int]]:
    """``[0, c)`` in consecutive ranges of at most ``limit`` channels (one range without a limit)."""
    step = c if limit is None else limit
    return [(g0, min(g0 + step, c)) for g0 in range(0, c, step)]


def _params(norm_weight: Tensor | None, norm_bias: Tensor | None, conv_weight: Tensor, g0: int, g1: int,
            whole: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """A layer's norm weight and bias and its convolution weight restricted to input channels ``[g0, g1)``."""
    if whole:
        return norm_weight, norm_bias, conv_weight
    return _part(norm_weight, g0, g1), _part(norm_bias, g0, g1), conv_weight[:, g0:g1].contiguous()


def _part(t: Tensor | None, g0: int, g1: int) -> Tensor | None:
    return None if t is None else t[g0:g1]


def _joined(parts: list[Tensor | None], dim: int) -> Tensor | None:
    """The channel groups' gradients of one parameter as one tensor (None when not computed)."""
    if parts[0] is None:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _dense(src: Tensor, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
    """A dense copy of the (strided) slice ``src`` in ``dtype`` and layout ``fmt``."""
    if src.dtype != dtype:
        return src.to(dtype, memory_format=fmt)
    return copy_channels_(torch.empty(src.shape, dtype=dtype, device=src.device, memory_format=fmt), src)


def lean_dense_forward(block: nn.Module, x: Tensor) -> Tensor:
    """The block's output through :class:`LeanDenseBlock` (callers check :func:`supported`); x is the block input
    or a buffer from :func:`lean_dense_buffer`."""
    if not is_buffer(x):
        x = lean_dense_buffer(block, [x])
    params = [t for layer in block.layers for t in (layer.norm.weight, layer.norm.bias, layer.conv.weight)]
    return LeanDenseBlock.apply(x, block, *params)


def lean_dense_buffer(block: nn.Module, parts: list[Tensor]) -> Tensor:
    """A (N, C_out, *spatial) buffer for :func:`lean_dense_forward` whose first C_in channels hold
    ``torch.cat(parts, 1)`` (no concatenated tensor is made): in the first part's layout and in the dtype
    ``torch.cat`` of the input and the convolutions' outputs gives (the parts' promoted with the autocast dtype,
    or with the weights' dtype without autocast)."""
    dtype = parts[0].dtype
    for part in parts[1:]:
        dtype = torch.promote_types(dtype, part.dtype)
    dev = parts[0].device.type
    conv_dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                  else torch.promote_types(dtype, block.layers[0].conv.weight.dtype))
    buf = _IntoBuffer.apply(block.out_channels, torch.promote_types(dtype, conv_dtype), memory_format_of(parts[0]),
                            *parts)
    buf._hmedn_lean_dense_buffer = True
    return buf


def is_buffer(x: Tensor) -> bool:
    """Whether x came from :func:`lean_dense_buffer` (then the lean block fills it in place; any other input is
    copied into a buffer of the block's own, never written to)."""
    return getattr(x, "_hmedn_lean_dense_buffer", False)
