"""Convolutions of the lean blocks: forward (:func:`conv_forward`) and gradients (:func:`conv_backward`, input and
weight gradient without re-running the forward).

Backends of the forward: ``"cuda"`` (:mod:`hmedn_fast.ops.conv_mma`: the extension's tensor-core kernel for 3x3x3
"same" convolutions of 32 -> 32 channels, bf16/fp16 channels-last, CUDA builds), ``"triton"``
(:mod:`hmedn_fast.ops.triton.conv_fwd`: 3x3x3 "same" convolutions, stride 1, 16 or 32 output channels, bf16/fp16
channels-last input, CUDA or ``TRITON_INTERPRET=1``) and ``"reference"`` (``F.conv2d`` / ``F.conv3d``).
Backends of the weight gradient: ``"cuda"`` (:func:`hmedn_fast.ops.conv_mma.conv3x3_wgrad`, 32 -> 32), ``"triton"``
(:mod:`hmedn_fast.ops.triton.conv_wgrad`, same shapes as its forward) and ``"reference"``
(``aten.convolution_backward``, any convolution). The input gradient (:func:`conv_input_grad`, also used by
:func:`conv_backward`): ``"cuda"`` and ``"triton"`` (each its forward kernel on the channel-swapped weights with the
taps reversed, same shapes) and ``"reference"`` (cuDNN's backward-data kernels).

Automatic choice where several can run: with ``torch.backends.cudnn.benchmark`` on (CUDA), the fastest one measured
on the first call of each shape (:mod:`hmedn_fast.ops.measured`); otherwise the static rules from the sweeps: the
CUDA kernel wherever it runs (:mod:`hmedn_fast.ops.conv_mma`), else :func:`prefers_triton_forward` (H200),
:func:`prefers_triton` and :func:`prefers_triton_input_grad` (H100).
``backend=`` or ``HMEDN_BACKEND_CONV_FWD`` / ``HMEDN_BACKEND_CONV_WGRAD`` / ``HMEDN_BACKEND_CONV_DGRAD``
(``HMEDN_BACKEND``) force one.
"""
from __future__ import annotations

import functools
from typing import Callable, Hashable, Mapping, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from hmedn_fast.ops import conv_mma, measured
from hmedn_fast.ops.copy import copy_channels_
from hmedn_fast.ops.dispatch import automatic, choose_backend, triton_unavailable
from hmedn_fast.ops.geometry import same_3x3_geometry_unsupported
from hmedn_fast.ops.strides import voxel_stride


def _triton_unavailable(grad: Tensor, inp: Tensor, weight: Tensor, stride, padding, dilation, groups) -> str | None:
    reason = triton_unavailable(grad, inp)
    if reason is not None:
        return reason
    from hmedn_fast.ops.triton.conv_wgrad import unsupported

    return unsupported(grad, inp, weight, stride, padding, dilation, groups)


def _choose(op: str, backend: str | None, reasons: Mapping[str, str | None], prefer: str,
            signature: Callable[[], Hashable], runners: Mapping[str, Callable[[], object]], tensor: Tensor) -> str:
    """The backend for one call of ``op``: forced (``backend=`` / ``HMEDN_BACKEND_<OP>``), else among the compiled
    kernels that can run (``reasons[name]`` None; the others map to why not) and ``"reference"`` the fastest measured
    per ``signature()`` (:mod:`measured`), else the static rule ``prefer`` where it can run, else ``"reference"``.
    Forcing a kernel that cannot run raises (choose_backend)."""
    available = [name for name, reason in reasons.items() if reason is None]
    first = prefer if prefer in available else "reference"
    if available and automatic(op, backend):
        first = measured.choice(signature(), {name: runners[name] for name in [*available, "reference"]}, first,
                                (tensor,))
    names = [first] + [name for name in (*reasons, "reference") if name != first]
    return choose_backend(op, backend, [(name, lambda name=name: reasons.get(name)) for name in names])


def prefers_triton(c_in: int, c_out: int) -> bool:
    """Whether the Triton weight gradient beat cuDNN in the H100 sweep
    (``benchmarks/results/conv_wgrad_nvidia_h100_80gb_hbm3.json``, hmedn_3d_l2's shapes): 1.5-3.3x for 16 output
    channels from 32-144 input channels, 1.6x for the dilated 32 -> 32; a tie for 16 -> 16 (cuDNN kept) and
    cuDNN faster for 320 -> 32 at 16^3 (0.033 vs 0.043 ms; the measured choice takes it there)."""
    return not (c_out == 16 and c_in <= 16)


def prefers_triton_forward(c_in: int, c_out: int) -> bool:
    """Whether the Triton forward beat cuDNN (``cudnn.benchmark``) by 10 % or more on the H200: 16 -> 16 channels
    1.48x, 48 -> 16 1.11x (``benchmarks/results/conv_fwd_H200.txt``, bf16 channels-last 128^3; cuDNN as fast or
    faster for 4, 32, 64, 80, 96 and 144 -> 16); the HR pathway's dilated 32 -> 32 at 64^3 with the box tiles of
    stop 26: 63 vs 73 us per call for dilations 2 and 4 (``blocks_nvidia_h200_s29.json``, ``measured_choices``)."""
    return (c_out == 16 and c_in in (16, 48)) or (c_in == 32 and c_out == 32)


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype :func:`conv_forward` computes ``conv(x, weight)`` in: autocast's for x's device when autocast is on,
    else the promoted dtype of x and the weight."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, weight.dtype)


def conv_forward(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 groups: int, backend: str | None = None, out: Tensor | None = None,
                 stats: bool = False, packed: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor | None]:
    """``F.conv{2,3}d(x, weight, None, stride, padding, dilation, groups)``, autocast honoured (the Triton path
    computes in the autocast dtype when autocast is on, as cuDNN would).

    Args:
        x: (N, C_in, *spatial). weight: (C_out, C_in / groups, *kernel).
        stride, padding, dilation, groups: the convolution's.
        backend: None (automatic), ``"triton"`` or ``"reference"``.
        out: None, or a tensor of the result's shape and compute dtype to hold it (a channel slice of a buffer, say):
            the Triton kernel writes into it directly (when it is in the compute dtype with channels innermost: a
            channels-last tensor or a channel slice of one), else the result is copied into it.
        stats: also return the output's per-tile channel statistics when the CUDA kernel runs and can write them
            (:func:`hmedn_fast.ops.conv_mma.tile_stats_shape`): float32 (N, tiles, 2, C_out) means and M2s, the
            ``part`` of :func:`hmedn_fast.ops.triton.norm.forward`; None otherwise.
        packed: None, or the weight already packed for the CUDA kernel in the compute dtype
            (:class:`hmedn_fast.ops.geometry.TapPacks`), which it then reads instead of packing it; other backends
            ignore it.
    Returns:
        (N, C_out, *spatial'), channels-last on the Triton backend; ``out`` when given. With ``stats``, ``(y, part)``.
    """
    fn = F.conv2d if weight.ndim == 4 else F.conv3d
    dev = x.device.type
    dt = compute_dtype(x, weight)
    cast: list[Tensor] = []  # x in the compute dtype, made once, only for a convolution some kernel can take
    part: list[Tensor] = []  # the CUDA kernel's tile statistics, when asked for and written

    def kernel_reasons() -> dict[str, str | None]:
        """Why each compiled kernel cannot run this call (None: it can)."""
        reasons = {"cuda": None if x.is_cuda else "x is not a CUDA tensor", "triton": triton_unavailable(x)}
        if torch.compiler.is_compiling():
            shared = "inside torch.compile"
        else:
            shared = same_3x3_geometry_unsupported(x, weight, stride, padding, dilation, groups)
            if shared is None and weight.shape[0] not in (16, 32):
                shared = "16 or 32 output channels"
            if shared is None and out is not None and (voxel_stride(out) is None or out.dtype != dt):
                shared = "an out tensor in the compute dtype with channels innermost"
        if shared is not None or all(reasons.values()):
            return {name: reason or shared for name, reason in reasons.items()}
        cast[:] = [x.to(dt)]
        if reasons["cuda"] is None:
            reasons["cuda"] = conv_mma.unsupported(cast[0], weight, dilation[0], out)
        if reasons["triton"] is None:
            from hmedn_fast.ops.triton.conv_fwd import unsupported

            reasons["triton"] = unsupported(cast[0], weight, stride, padding, dilation, groups)
        return reasons

    def run(name: str, into: Tensor | None = None, with_stats: bool = False) -> Tensor:
        if name == "cuda":
            shape = conv_mma.tile_stats_shape(cast[0], dilation[0]) if with_stats else None
            if shape is not None:
                part[:] = [torch.empty(shape, device=x.device, dtype=torch.float32)]
            return conv_mma.conv3x3_forward(cast[0], weight, dilation[0], out=into,  # the kernels round the weight
                                            stats=part[0] if part else None, packed=packed)
        if name == "triton":
            from hmedn_fast.ops.triton.conv_fwd import conv3x3_forward

            return conv3x3_forward(cast[0], weight, dilation[0], out=into)
        # x as cast above where that was done (autocast would cast it alike); autocast rounds the weight itself
        y = fn(cast[0] if cast and torch.is_autocast_enabled(dev) else x, weight, None, stride, padding, dilation,
               groups)
        return y if into is None else copy_channels_(into, y)

    reasons = kernel_reasons()
    prefer = "cuda" if reasons["cuda"] is None else (
        "triton" if weight.ndim == 5 and prefers_triton_forward(weight.shape[1], weight.shape[0]) else "reference")
    chosen = _choose(  # measuring (the first call of a shape) runs every backend: only the chosen one writes into out
        "conv_fwd", backend, reasons, prefer,
        lambda: ("conv_fwd", x.device, x.dtype, dt, tuple(x.shape), x.stride(), tuple(weight.shape), tuple(stride),
                 tuple(padding), tuple(dilation), groups),
        {name: (lambda name=name: run(name)) for name in ("cuda", "triton", "reference")}, x)
    y = run(chosen, out, stats)
    return (y, part[0] if part else None) if stats else y


def conv_backward(
    grad: Tensor, inp: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int, need_input: bool, need_weight: bool, backend: str | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``conv(inp, weight)`` (no bias) w.r.t. its input and weight, given the output gradient.

    Args:
        grad: (N, C_out, *spatial) output gradient; its dtype is the compute dtype (the forward's, e.g. bf16
            under autocast).
        inp: (N, C_in, *spatial) the forward's input (cast to grad's dtype).
        weight: (C_out, C_in / groups, *kernel) (cast to grad's dtype).
        stride, padding, dilation, groups: the convolution's.
        need_input, need_weight: which gradients to compute (None for the other).
        backend: weight-gradient backend, None (automatic), ``"cuda"`` (:func:`hmedn_fast.ops.conv_mma.conv3x3_wgrad`,
            32 -> 32 "same" 3x3x3), ``"triton"`` or ``"reference"``. The input gradient's backend is chosen as in
            :func:`conv_input_grad` (``HMEDN_BACKEND_CONV_DGRAD`` forces one).
    Returns:
        ``(grad_input, grad_weight)``: grad_input in inp's dtype, grad_weight in weight's dtype (the CUDA and Triton
        kernels accumulate in float32 and round once to it; ATen's in grad's dtype first).
    """
    dt = grad.dtype
    x = inp.to(dt)
    cast_weight = functools.cache(lambda: weight.to(dt))  # for ATen only: the kernels round the weight as they pack it
    input_backend = _input_grad_backend(grad, weight, x.shape, stride, padding, dilation, groups, None) \
        if need_input else "reference"
    kernel_input = input_backend != "reference"

    def run(weight_backend: str) -> tuple[Tensor | None, Tensor | None]:
        gi = gw = None
        aten_input, aten_weight = need_input and not kernel_input, need_weight and weight_backend == "reference"
        if aten_input or aten_weight:
            gi, gw, _ = torch.ops.aten.convolution_backward(
                grad, x, cast_weight(), None, list(stride), list(padding), list(dilation), False,
                [0] * (weight.ndim - 2), groups, [aten_input, aten_weight, False])
        if weight_backend == "cuda":
            gw = conv_mma.conv3x3_wgrad(grad, x, dilation[0])
        elif weight_backend == "triton":
            from hmedn_fast.ops.triton.conv_wgrad import conv3x3_wgrad

            gw = conv3x3_wgrad(grad, x, dilation[0])
        if kernel_input:
            gi = _input_grad(input_backend, grad, weight, dilation[0])
        return gi, gw

    if not need_weight:
        gi, gw = run("none")
    else:
        geometry = same_3x3_geometry_unsupported(x, weight, stride, padding, dilation, groups)
        reasons = {"cuda": geometry or conv_mma.wgrad_unsupported(grad, x, dilation[0]),
                   "triton": _triton_unavailable(grad, x, weight, stride, padding, dilation, groups)}
        prefer = "cuda" if reasons["cuda"] is None else (
            "triton" if prefers_triton(weight.shape[1], weight.shape[0]) else "reference")
        chosen = _choose(
            "conv_wgrad", backend, reasons, prefer,
            lambda: ("conv_wgrad", grad.device, dt, tuple(grad.shape), grad.stride(), tuple(x.shape), x.stride(),
                     tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation), groups, need_input,
                     input_backend),
            {name: (lambda name=name: run(name)) for name in ("cuda", "triton", "reference")}, grad)
        gi, gw = run(chosen)
    return (gi.to(inp.dtype) if gi is not None else None), (gw.to(weight.dtype) if gw is not None else None)


def prefers_triton_input_grad(c_in: int, c_out: int) -> bool:
    """Whether the Triton input gradient beat cuDNN's (``cudnn.benchmark``) in the H100 sweep
    (``benchmarks/results/conv_dgrad_nvidia_h100_80gb_hbm3.json``, bf16 channels-last): 1.5-1.8x for 16 output
    channels to 16-64 input channels at 128^3, 1.2-1.6x to 96 and 144 at 64^3, 1.1x for the dilated 32 -> 32;
    cuDNN 2.8x faster for 32 -> 160 at 16^3 (the measured choice takes it where it wins)."""
    return c_out == 16 or (c_out == 32 and c_in <= 32)


def _input_grad_backend(grad: Tensor, weight: Tensor, input_shape: Sequence[int], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], groups: int, backend: str | None) -> str:
    """``"cuda"``, ``"triton"`` or ``"reference"`` for this input gradient: forced, measured (``cudnn.benchmark``), or
    the static rule (the CUDA kernel where it runs, else :func:`prefers_triton_input_grad`)."""
    shared = same_3x3_geometry_unsupported(grad, weight, stride, padding, dilation, groups)
    if shared is None and tuple(input_shape[2:]) != tuple(grad.shape[2:]):
        shared = "padding equal to one dilation for every axis ('same' output)"
    reasons = {"cuda": shared or conv_mma.unsupported(grad, weight, dilation[0]), "triton": triton_unavailable(grad)}
    if reasons["triton"] is None:
        from hmedn_fast.ops.triton.conv_fwd import input_grad_unsupported

        reasons["triton"] = input_grad_unsupported(grad, weight, input_shape, stride, padding, dilation, groups)
    prefer = "cuda" if reasons["cuda"] is None else (
        "triton" if prefers_triton_input_grad(weight.shape[1], weight.shape[0]) else "reference")
    no_padding = [0] * (grad.ndim - 2)  # timed only for the kernel's "same" geometry: no output padding
    return _choose(
        "conv_dgrad", backend, reasons, prefer,
        lambda: ("conv_dgrad", grad.device, grad.dtype, tuple(grad.shape), grad.stride(), tuple(weight.shape),
                 tuple(dilation)),
        {"cuda": lambda: _input_grad("cuda", grad, weight, dilation[0]),
         "triton": lambda: _input_grad("triton", grad, weight, dilation[0]),
         "reference": lambda: _transposed(grad, weight, no_padding, stride, padding, dilation, groups)}, grad)


def _input_grad(name: str, grad: Tensor, weight: Tensor, dilation: int, packed: Tensor | None = None) -> Tensor:
    """The input gradient by the compiled kernel ``name`` ("cuda" or "triton"; ``packed``: see
    :func:`conv_input_grad`)."""
    if name == "cuda":
        return conv_mma.conv3x3_input_grad(grad, weight, dilation, packed=packed)
    from hmedn_fast.ops.triton.conv_fwd import conv3x3_input_grad

    return conv3x3_input_grad(grad, weight, dilation)


def _output_padding(grad: Tensor, weight: Tensor, input_shape: Sequence[int], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int) -> list[int]:
    """The transposed convolution's output padding that gives ``input_shape``; ValueError if none does."""
    natural = [(o - 1) * s - 2 * p + d * (kk - 1) + 1
               for o, s, p, d, kk in zip(grad.shape[2:], stride, padding, dilation, weight.shape[2:])]
    extra = [int(i) - n for i, n in zip(input_shape[2:], natural)]
    if (len(input_shape) != grad.ndim or any(not 0 <= e < max(s, d) for e, s, d in zip(extra, stride, dilation))
            or input_shape[1] != weight.shape[1] * groups):
        raise ValueError(f"input_shape {tuple(input_shape)} does not fit this convolution's output "
                         f"{tuple(grad.shape)} and weight {tuple(weight.shape)}")
    return extra


def _transposed(grad: Tensor, weight: Tensor, output_padding: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """The input gradient as the transposed convolution of ``grad`` (cuDNN's backward-data kernels)."""
    fn = F.conv_transpose2d if weight.ndim == 4 else F.conv_transpose3d
    return fn(grad, weight.to(grad.dtype), None, list(stride), list(padding), list(output_padding), groups,
              list(dilation))


def conv_input_grad(grad: Tensor, weight: Tensor, input_shape: Sequence[int], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int, backend: str | None = None,
                    add_to: Tensor | None = None, packed: Tensor | None = None) -> Tensor:
    """Input gradient of ``conv(x, weight)`` for an x of ``input_shape``, without x itself, in grad's dtype. Lets a
    caller free the forward's input before this gradient is allocated (``aten.convolution_backward`` takes the
    input tensor even when only the input gradient is asked for).

    Args:
        grad: (N, C_out, *out_spatial). weight: (C_out, C_in / groups, *kernel) (cast to grad's dtype).
        input_shape: (N, C_in, *spatial) of the forward's input.
        stride, padding, dilation, groups: the convolution's.
        backend: None (automatic), ``"reference"`` (the transposed convolution, cuDNN's backward-data kernels, in
            grad's layout), ``"triton"`` (:func:`hmedn_fast.ops.triton.conv_fwd.conv3x3_input_grad`: 3x3x3
            "same" convolutions, stride 1, bf16/fp16 channels-last gradients; channels-last output) or ``"cuda"``
            (:func:`hmedn_fast.ops.conv_mma.conv3x3_input_grad`: the same for 32 -> 32 channels). Automatic:
            the fastest measured per signature while ``cudnn.benchmark`` is on, else the CUDA kernel where it runs,
            else :func:`prefers_triton_input_grad` where the Triton kernel can run.
        add_to: None, or a tensor of ``input_shape`` (e.g. another gradient of the same input) that the gradient is
            added into, in place, and returned: the CUDA kernel adds it in its epilogue (the float32 sum rounded once,
            no separate add) when add_to has grad's dtype and the kernel's layout; elsewhere ``add_to.add_``.
        packed: None, or the weight already packed for the CUDA kernel's input gradient in grad's dtype
            (:meth:`hmedn_fast.ops.geometry.TapPacks.input_grad`); other backends ignore it.
    Returns:
        The input gradient in grad's dtype, or ``add_to`` holding the sum.
    """
    extra = _output_padding(grad, weight, input_shape, stride, padding, dilation, groups)
    if add_to is not None and tuple(add_to.shape) != tuple(input_shape):
        raise ValueError(f"add_to must have the input's shape {tuple(input_shape)}, got {tuple(add_to.shape)}")
    name = _input_grad_backend(grad, weight, input_shape, stride, padding, dilation, groups, backend)
    if name == "cuda" and add_to is not None and conv_mma.unsupported(grad, weight, dilation[0], add_to) is None:
        return conv_mma.conv3x3_input_grad(grad, weight, dilation[0], add_to=add_to, packed=packed)
    if name != "reference":
        gi = _input_grad(name, grad, weight, dilation[0], packed)
    else:
        gi = _transposed(grad, weight, extra, stride, padding, dilation, groups)
    return gi if add_to is None else add_to.add_(gi)


__all__ = ["conv_backward", "conv_forward", "conv_input_grad", "prefers_triton", "prefers_triton_forward",
           "prefers_triton_input_grad"]
