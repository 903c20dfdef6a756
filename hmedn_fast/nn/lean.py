"""Memory-lean autograd of the residual dilated block and of the HR pathway's dense fusion.

Eager autograd keeps four full-size tensors per residual dilated block for the backward pass (the first
conv's output, the first ReLU's output, the second conv's output and the block output). The custom
:class:`LeanResidualBlock` function keeps less and recomputes the rest in its backward:

- ``"lean"``: the block input (the previous block's output, alive anyway) and the two conv outputs; norm and
  ReLU are recomputed (memory-bound, cheap), the convolutions are not. 2 tensors per block instead of 4.
- ``"middle"``: the block input and the second conv's output; the first convolution is recomputed too (one extra
  convolution per block). 1 tensor per block. The second conv's output is the one kept: the second norm's
  backward needs it at every voxel, and recomputing it would need the first conv's output anyway.
- ``"blocks"``: the block input only; both convolutions are recomputed too (one extra forward of the block's
  convs, as ``torch.utils.checkpoint``, but without re-running the norms' running-statistics update).

Norm statistics are recomputed from the saved conv outputs in the same way as the forward computed them
(batch statistics in training, running statistics in eval), so gradients equal eager autograd's. The norm +
(residual) + ReLU goes through :func:`hmedn_fast.ops.norm_act.norm_act` (its automatic backend; the fused Triton
kernels when forced), the convolution gradients through ``aten.convolution_backward`` without re-running the forward convolution.
Blocks whose two norms are BatchNorm (the default) run :class:`LeanBatchNormBlock` instead: the same saved
tensors, replayed with the forward's batch statistics and differentiated by calling the norm (the fused Triton
kernels on CUDA, ATen's BatchNorm elsewhere) and convolution backward kernels directly (no nested autograd: the
generic function is host-bound on small volumes).
Autocast is honoured: the backward replays the forward's autocast state and computes conv gradients in the
dtype the forward convolutions ran in. The function is differentiable once (no double backward).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.conv import conv_backward, conv_forward, conv_input_grad
from ..ops.geometry import TapPacks
from ..ops.grad_meet import GradMeet
from ..ops.conv1x1 import WeightGradSink, conv1x1_add
from ..ops.norm_act import choose, norm_act

MODES = ("none", "lean", "middle", "blocks")
RECOMPUTED = {"lean": 0, "middle": 1, "blocks": 2}  # convolutions each mode runs again in backward
_NORMS = (nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm)


def supports(norm: nn.Module) -> bool:
    """True for the norm modules the lean function reproduces (BatchNorm, InstanceNorm, GroupNorm)."""
    return isinstance(norm, _NORMS)


def is_batch_norm(norm: nn.Module) -> bool:
    """True for BatchNorm modules (served by :class:`LeanBatchNormBlock`)."""
    return isinstance(norm, nn.modules.batchnorm._BatchNorm)


def norm_call(norm: nn.Module, update: bool) -> dict:
    """Keyword arguments of :func:`norm_act` that reproduce ``norm``'s forward.

    ``update=True`` mirrors the module exactly (counting the batch and updating running statistics in
    training); ``update=False`` gives the same normalisation without touching any buffer (for recomputation).
    """
    if isinstance(norm, nn.GroupNorm):
        return dict(kind="group", num_groups=norm.num_groups, eps=norm.eps)
    kind = "batch" if is_batch_norm(norm) else "instance"
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if update and norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    batch_stats = norm.training or norm.running_mean is None
    keep_running = not batch_stats or (update and norm.track_running_stats)
    return dict(kind=kind, eps=norm.eps, momentum=momentum, training=batch_stats,
                running_mean=norm.running_mean if keep_running else None,
                running_var=norm.running_var if keep_running else None)


def norm_relu(norm: nn.Module, x: Tensor) -> Tensor:
    """``relu(norm(x))`` through :func:`norm_act` (automatic backend) for the norms it reproduces, counting the
    batch and updating running statistics as the module would; plain ``relu(norm(x))`` for any other module
    (e.g. the ``nn.Identity`` left by :func:`hmedn_fast.nn.fusion.fuse_for_inference`)."""
    if not supports(norm):
        return torch.relu(norm(x))
    return norm_act(x, norm.weight, norm.bias, **norm_call(norm, update=True))


def _conv(x: Tensor, weight: Tensor, conv: nn.Module, out: Tensor | None = None,
          packed: Tensor | None = None) -> Tensor:
    """``conv``'s convolution (no bias) through :func:`hmedn_fast.ops.conv.conv_forward` (its automatic backend),
    into ``out`` when given; ``packed``: the weight packed for the CUDA kernel, or None."""
    return conv_forward(x, weight, conv.stride, conv.padding, conv.dilation, conv.groups, out=out, packed=packed)


def _conv_stats(x: Tensor, weight: Tensor, conv: nn.Module, want: bool,
                packed: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``_conv`` and, when ``want``, its output's per-tile channel statistics if the CUDA kernel wrote them (a batch
    norm's reduce pass done in the convolution's epilogue), else None."""
    if not want:
        return _conv(x, weight, conv, packed=packed), None
    return conv_forward(x, weight, conv.stride, conv.padding, conv.dilation, conv.groups, stats=True, packed=packed)


def _packed(packs: tuple[TapPacks, int, int] | None, conv: int, input_grad: bool = False) -> Tensor | None:
    """Convolution ``conv``'s (1 or 2) weight from a block's ``packs`` (its
    :class:`~hmedn_fast.ops.geometry.TapPacks` and the indices of its two weights in it), packed for the forward or,
    with ``input_grad``, for the input gradient; None without packs."""
    if packs is None:
        return None
    taps, index = packs[0], packs[conv]
    return taps.input_grad(index) if input_grad else taps.forward[index]


def _conv_backward(grad: Tensor, inp: Tensor, weight: Tensor, conv: nn.Module, need_input: bool,
                   need_weight: bool) -> tuple[Tensor | None, Tensor | None]:
    """Input and weight gradients of ``_conv``, computed in the dtype ``grad`` has (the forward's compute dtype):
    :func:`hmedn_fast.ops.conv.conv_backward` (its automatic weight-gradient backend)."""
    return conv_backward(grad, inp, weight, conv.stride, conv.padding, conv.dilation, conv.groups, need_input,
                         need_weight)


def _weight_grad(grad: Tensor, inp: Tensor, weight: Tensor, conv: nn.Module, need: bool) -> Tensor | None:
    """The weight gradient of ``_conv`` alone (None when not ``need``), so a caller can free ``inp`` before the input
    gradient is allocated."""
    return _conv_backward(grad, inp, weight, conv, False, True)[1] if need else None


def _grads(outputs: Tensor, inputs: list[Tensor | None], grad: Tensor) -> list[Tensor | None]:
    """autograd.grad over the inputs that require grad, None for the others."""
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(outputs, live, grad)) if live else iter(())
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def _kept(recompute: int) -> tuple[bool, bool]:
    """Whether a block saves its first and its second conv output when ``recompute`` (0, 1 or 2: :data:`RECOMPUTED`)
    convolutions run again in backward: both, the second, none. Checked before the forward runs."""
    if recompute not in (0, 1, 2):
        raise ValueError(f"recompute must be 0, 1 or 2 (convolutions recomputed in backward), got {recompute!r}")
    return recompute == 0, recompute < 2


class LeanConv(torch.autograd.Function):
    """``conv(x, weight)`` of a bias-free ``nn.Conv2d`` / ``nn.Conv3d`` on :mod:`hmedn_fast.ops.conv`'s automatic
    backends (the tensor-core CUDA and Triton kernels for the 3x3x3 shapes they take, ``F.conv*d`` and ATen's
    backward elsewhere): the HR pathway's projection in the lean modes. Saves x (as given) and the weight, as
    eager autograd; the backward calls :func:`hmedn_fast.ops.conv.conv_backward` (no forward re-run).
    Inputs: x (N, C_in, *spatial), the weight (C_out, C_in, *kernel), the module (its geometry).
    Output: (N, C_out, *spatial) in the compute dtype (autocast's when on)."""

    @staticmethod
    def forward(ctx, x, weight, conv):
        ctx.conv = conv
        ctx.save_for_backward(x, weight)
        return _conv(x, weight, conv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx, gw = _conv_backward(grad, x, weight, ctx.conv, need[0], need[1])
        return gx, gw, None


class LeanResidualBlock(torch.autograd.Function):
    """``relu(norm2(conv2(relu(norm1(conv1(x))))) + x)`` saving x and the conv outputs that ``recompute`` (0, 1 or
    2 convolutions run again in backward, :data:`RECOMPUTED`) does not drop. Inputs: x, the block module,
    ``recompute``, then the six parameters (conv1.weight, norm1.weight, norm1.bias, conv2.weight, norm2.weight,
    norm2.bias; norm ones may be None)."""

    @staticmethod
    def forward(ctx, x, block, recompute, w1, g1, b1, w2, g2, b2):
        keep1, keep2 = _kept(recompute)
        c1 = _conv(x, w1, block.conv1)
        a1 = norm_act(c1, g1, b1, **norm_call(block.norm1, update=True))
        c2 = _conv(a1, w2, block.conv2)
        y = norm_act(c2, g2, b2, residual=x, **norm_call(block.norm2, update=True))
        ctx.block = block
        ctx.norm_args = (norm_call(block.norm1, update=False), norm_call(block.norm2, update=False))
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, w1, g1, b1, w2, g2, b2, c1 if keep1 else None, c2 if keep2 else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, w1, g1, b1, w2, g2, b2, c1, c2 = ctx.saved_tensors
        block, (n1, n2) = ctx.block, ctx.norm_args
        dev, autocast_on, autocast_dtype = ctx.autocast
        need = ctx.needs_input_grad
        with torch.enable_grad(), torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_on):
            if c1 is None:
                with torch.no_grad():
                    c1 = _conv(x, w1, block.conv1)
            c1 = c1.detach().requires_grad_()
            a1 = norm_act(c1, g1, b1, **n1)
            if c2 is None:
                with torch.no_grad():
                    c2 = _conv(a1.detach(), w2, block.conv2)
            c2 = c2.detach().requires_grad_()
            xr = x.detach().requires_grad_(need[0])
            y = norm_act(c2, g2, b2, residual=xr, **n2)
            gc2, gx_res, gg2, gb2 = _grads(y, [c2, xr, g2, b2], gy)
            del y, c2, xr  # each tensor dropped once dead (see LeanBatchNormBlock)
            ga1, gw2 = _conv_backward(gc2, a1.detach(), w2, block.conv2, True, need[6])
            del gc2
            gc1, gg1, gb1 = _grads(a1, [c1, g1, b1], ga1.to(a1.dtype))
            del a1, ga1, c1
            gx, gw1 = _conv_backward(gc1, x, w1, block.conv1, need[0], need[3])
        if gx is not None:
            gx = gx + gx_res.to(gx.dtype)
        return gx, None, None, gw1, gg1, gb1, gw2, gg2, gb2


def _batch_norm(c: Tensor, weight: Tensor | None, bias: Tensor | None, call: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``norm(c)`` of a BatchNorm described by ``call`` (:func:`norm_call`), running statistics updated as the
    module would, and the ``(mean, 1 / sqrt(var + eps))`` it normalised with (to replay it without reducing)."""
    out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        c, weight, bias, call["running_mean"], call["running_var"], call["training"], call["momentum"], call["eps"])
    if call["training"]:
        return out, save_mean, save_invstd
    var = call["running_var"]
    return out, call["running_mean"].clone(), var.double().add(call["eps"]).rsqrt().to(var.dtype)


def _variance(invstd: Tensor, eps: float) -> Tensor:
    return invstd.double().pow(-2).sub(eps).to(invstd.dtype)


class LeanBatchNormBlock(torch.autograd.Function):
    """:class:`LeanResidualBlock` for BatchNorm blocks (the default norm) without nested autograd.

    The forward keeps each norm's statistics (C floats); the backward replays ``relu(norm1(c1))`` with them (one
    elementwise pass, no statistics reduction) and calls the norm and convolution backward kernels directly.
    Two norm engines, chosen per block by :func:`hmedn_fast.ops.norm_act.choose` (Triton wherever it runs, i.e. on
    CUDA; ``HMEDN_BACKEND_NORM_ACT`` forces one):

    - Triton (:mod:`hmedn_fast.ops.triton.norm`): norm + ReLU and norm + residual + ReLU in one fused forward each,
      the backward recomputes the ReLU masks from the saved conv outputs (and the block input), 3 launches per norm
      and direction;
    - ATen: ``native_batch_norm`` / ``native_batch_norm_backward`` (the kernels eager autograd runs), separate
      ReLU, residual and ReLU-backward passes, the second ReLU's mask from the block output (saved: the next
      block's input, alive anyway).

    Inputs as :class:`LeanResidualBlock`, then ``packs``: None, or ``(TapPacks, i1, i2)``, the block's two
    convolution weights already packed for the CUDA kernel (:class:`hmedn_fast.ops.geometry.TapPacks`, entries i1 and
    i2; the HR pathway packs all its blocks' weights at once), and ``meet``: None, or the
    :class:`~hmedn_fast.ops.grad_meet.GradMeet` where x's gradient meets its dense-fusion term's.
    """

    @staticmethod
    def forward(ctx, x, block, recompute, w1, g1, b1, w2, g2, b2, packs=None, meet=None):
        keep1, keep2 = _kept(recompute)
        ctx.meet = meet if meet is not None and x.requires_grad else None
        if ctx.meet is not None:
            ctx.meet.join()
        call1, call2 = norm_call(block.norm1, update=True), norm_call(block.norm2, update=True)
        # the CUDA convolution kernel can hand over each norm's batch statistics per output tile (no reduce pass)
        c1, part1 = _conv_stats(x, w1, block.conv1, call1["training"], _packed(packs, 1))
        triton = choose(c1, "batch", call1["training"], prefer_triton=c1.is_cuda) == "triton"
        if triton:
            x, _ = norm_kernels().flat(x)
            a1, coef1, _ = triton_norm_forward(c1, None, g1, b1, call1, part1)
            c2, part2 = _conv_stats(a1, w2, block.conv2, call2["training"], _packed(packs, 2))
            y, coef2, _ = triton_norm_forward(c2, x, g2, b2, call2, part2)
            stats1, stats2, out = (coef1,), (coef2,), ()
        else:
            n1, mean1, inv1 = _batch_norm(c1, g1, b1, call1)
            a1 = torch.relu_(n1)
            c2 = _conv(a1, w2, block.conv2, packed=_packed(packs, 2))
            n2, mean2, inv2 = _batch_norm(c2, g2, b2, call2)
            y = torch.relu_(n2.add_(x)) if n2.dtype == torch.promote_types(n2.dtype, x.dtype) else torch.relu(n2 + x)
            stats1, stats2, out = (mean1, inv1), (mean2, inv2), (y,)
        ctx.block, ctx.triton, ctx.packs = block, triton, packs
        ctx.train = (call1["training"], call2["training"])
        ctx.eps = (call1["eps"], call2["eps"])
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, *out, w1, g1, b1, w2, g2, b2, *stats1, *stats2, c1 if keep1 else None,
                              c2 if keep2 else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        if ctx.triton:
            return _triton_block_backward(ctx, gy)
        x, y, w1, g1, b1, w2, g2, b2, mean1, inv1, mean2, inv2, c1, c2 = ctx.saved_tensors
        block, (train1, train2), (eps1, eps2) = ctx.block, ctx.train, ctx.eps
        dev, autocast_on, autocast_dtype = ctx.autocast
        need = ctx.needs_input_grad
        autocast = torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_on)

        def first(c1: Tensor | None) -> tuple[Tensor, Tensor]:
            """c1 (recomputed when not saved) and relu(norm1(c1)) replayed with the forward's statistics."""
            with autocast:
                c1 = _conv(x, w1, block.conv1, packed=_packed(ctx.packs, 1)) if c1 is None else c1
                a1 = torch.ops.aten.native_batch_norm(c1, g1, b1, mean1, _variance(inv1, eps1), False, 0.0, eps1)[0]
                return c1, torch.relu_(a1)

        a1 = None
        if c2 is None:
            c1, a1 = first(c1)
            with autocast:
                c2 = _conv(a1, w2, block.conv2, packed=_packed(ctx.packs, 2))
        gz2 = torch.ops.aten.threshold_backward(gy, y, 0)  # gradient at norm2(c2) + x
        gc2, gg2, gb2 = _batch_norm_backward(gz2.to(c2.dtype), c2, g2, mean2, inv2, train2, eps2,
                                             [True, need[7], need[8]])
        del c2  # each tensor dropped once dead, so the next gradients (one activation each) do not add to it
        if a1 is None:  # made after the second norm's backward, which does not need it
            c1, a1 = first(c1)
        ga1, gw2 = _conv_backward(gc2, a1, w2, block.conv2, True, need[6])
        del gc2
        gn1 = torch.ops.aten.threshold_backward(ga1.to(a1.dtype), a1, 0)
        del ga1, a1
        gc1, gg1, gb1 = _batch_norm_backward(gn1, c1, g1, mean1, inv1, train1, eps1, [True, need[4], need[5]])
        del gn1, c1
        gx, gw1 = _conv_backward(gc1, x, w1, block.conv1, need[0], need[3])
        if gx is not None:
            gx = gx.add_(gz2.to(gx.dtype))
        return _settled(ctx.meet, gx), None, None, gw1, gg1, gb1, gw2, gg2, gb2, None, None


def _settled(meet: GradMeet | None, gx: Tensor | None) -> Tensor | None:
    """The block input's gradient to return: ``gx``, or :meth:`GradMeet.settle` of it where the input's gradient
    meets its dense-fusion term's."""
    return gx if gx is None or meet is None else meet.settle(gx)


def norm_kernels():
    """:mod:`hmedn_fast.ops.triton.norm` (imported on first use: Triton is optional)."""
    from ..ops.triton import norm
    return norm


def triton_norm_forward(c: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                        call: dict, part: Tensor | None = None) -> tuple[Tensor, Tensor, tuple]:
    """``relu(norm(c) (+ residual))`` of a BatchNorm described by ``call`` (:func:`norm_call`) on the Triton
    kernels, running statistics updated as the module would; returns it, the coefficients its backward and replay
    need, and the kernels' geometry of c. ``part``: c's batch statistics per chunk, already reduced (the
    convolution's tile statistics), or None."""
    k = norm_kernels()
    c, cs = k.flat(c)
    geo = k.geometry(tuple(c.shape), cs, None if residual is None else k.ncs_strides(residual), "batch", 1,
                     call["training"])
    update = call["training"] and call["running_mean"] is not None
    y, coef = k.forward(geo, c, residual, weight, bias, call["running_mean"], call["running_var"], call["eps"],
                        call["momentum"], True, call["training"], update, part if call["training"] else None)
    return y, coef, geo


def _triton_block_backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
    """LeanBatchNormBlock's backward on the Triton norm kernels (the forward's engine)."""
    k = norm_kernels()
    x, w1, g1, b1, w2, g2, b2, coef1, coef2, c1, c2 = ctx.saved_tensors
    block, (train1, train2) = ctx.block, ctx.train
    dev, autocast_on, autocast_dtype = ctx.autocast
    need = ctx.needs_input_grad
    autocast = torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_on)

    def first(c1: Tensor | None) -> tuple[Tensor, Tensor, tuple]:
        """c1 (recomputed when not saved), relu(norm1(c1)) replayed with the forward's coefficients, c1's geometry."""
        with autocast:
            c1 = _conv(x, w1, block.conv1, packed=_packed(ctx.packs, 1)) if c1 is None else c1
        c1, cs1 = k.flat(c1)
        geo1 = k.geometry(tuple(c1.shape), cs1, None, "batch", 1, train1)
        return c1, k.apply(geo1, c1, None, coef1, True), geo1

    a1 = None
    if c2 is None:
        c1, a1, geo1 = first(c1)
        with autocast:
            c2 = _conv(a1, w2, block.conv2, packed=_packed(ctx.packs, 2))
    c2, cs2 = k.flat(c2)
    geo2 = k.geometry(tuple(c2.shape), cs2, k.ncs_strides(x), "batch", 1, train2)
    gc2, gg2, gb2, gx_res = k.backward(geo2, c2, x, gy, g2, coef2, True, train2, need[7] and g2 is not None,
                                       b2.dtype if need[8] and b2 is not None else None, need[0])
    del c2  # each tensor dropped once dead, so the next gradients (one activation each) do not add to it
    if a1 is None:  # made after the second norm's backward, which does not need it
        c1, a1, geo1 = first(c1)
    conv2 = block.conv2  # weight gradient first, so a1 is gone before the input gradient is allocated
    gw2 = _weight_grad(gc2, a1, w2, conv2, need[6])
    shape = a1.shape
    del a1
    ga1 = conv_input_grad(gc2, w2, shape, conv2.stride, conv2.padding, conv2.dilation, conv2.groups,
                          packed=_packed(ctx.packs, 2, input_grad=True))
    del gc2
    gc1, gg1, gb1, _ = k.backward(geo1, c1, None, ga1, g1, coef1, True, train1, need[4] and g1 is not None,
                                  b1.dtype if need[5] and b1 is not None else None, False)
    del ga1, c1
    conv1 = block.conv1  # the input gradient added into the residual path's (in the CUDA kernel's epilogue)
    gw1 = _weight_grad(gc1, x, w1, conv1, need[3])
    gx = None
    if need[0]:
        gx = conv_input_grad(gc1, w1, x.shape, conv1.stride, conv1.padding, conv1.dilation, conv1.groups,
                             add_to=gx_res.to(x.dtype), packed=_packed(ctx.packs, 1, input_grad=True))
    return _settled(ctx.meet, gx), None, None, gw1, gg1, gb1, gw2, gg2, gb2, None, None


def _batch_norm_backward(grad: Tensor, c: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, train: bool,
                         eps: float, mask: list[bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`_batch_norm` w.r.t. its input, weight and bias (``mask`` says which)."""
    mask = [mask[0], mask[1] and weight is not None, mask[2] and weight is not None]
    if train:  # batch statistics, as saved by the forward
        return torch.ops.aten.native_batch_norm_backward(grad, c, weight, None, None, mean, invstd, True, eps, mask)
    return torch.ops.aten.native_batch_norm_backward(grad, c, weight, mean, _variance(invstd, eps), None, None, False,
                                                     eps, mask)


class DenseFusionSum:
    """A 1x1 convolution over the concatenation of features that arrive one at a time, as the running sum of
    per-input 1x1 convolutions with the matching slices of ``conv.weight`` (no concatenation is materialised or
    saved for backward).

    Adding each term as soon as its feature exists (inside the pathway's block loop) also bounds the backward's
    memory: autograd runs ready nodes newest first, so the gradient a term sends to its feature is made just
    before the block that consumes that feature runs backward, instead of the fusion's backward making every
    feature's gradient at once and holding them all while the blocks run backward.

    Args:
        conv: a 1x1 ``nn.Conv2d`` / ``nn.Conv3d`` (groups=1).
    """

    def __init__(self, conv: nn.Module) -> None:
        self.conv, self.start, self.out = conv, 0, None
        self.sink = WeightGradSink(conv.weight)

    def add(self, feature: Tensor, meet: GradMeet | None = None) -> None:
        """Add the term of the next ``feature`` (N, C_i, *spatial): the next C_i input channels of ``conv``
        (:func:`hmedn_fast.ops.conv1x1.conv1x1_add`: on CUDA one fused Triton kernel per term and pass, the weight's
        gradient gathered by one :class:`~hmedn_fast.ops.conv1x1.WeightGradSink`). ``meet``: where the feature's
        gradient from this term meets the one from the block that consumes it (None: autograd adds them)."""
        conv = self.conv
        self.out = conv1x1_add(self.out, feature, conv.weight, conv.bias if self.start == 0 else None,
                               start=self.start, sink=self.sink, meet=meet)
        self.start += feature.shape[1]

    def result(self) -> Tensor:
        """(N, conv.out_channels, *spatial), equal to ``conv(torch.cat(features, 1))``."""
        if self.out is None or self.start != self.conv.in_channels:
            raise ValueError(f"the features added have {self.start} channels, conv takes {self.conv.in_channels}")
        return self.out


def dense_fusion_sum(features: list[Tensor], conv: nn.Module) -> Tensor:
    """``conv(torch.cat(features, 1))`` for a 1x1 ``conv`` as a :class:`DenseFusionSum` of ``features``
    (tensors (N, C_i, *spatial) with sum C_i = ``conv.in_channels``)."""
    fusion = DenseFusionSum(conv)
    for f in features:
        fusion.add(f)
    return fusion.result()
