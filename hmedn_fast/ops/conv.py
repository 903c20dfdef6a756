"""Convolution gradients of the lean blocks (input and weight gradient without re-running the forward).

Backends of the weight gradient, in order of preference: ``"triton"`` (:mod:`hmedn_fast.ops.triton.conv_wgrad`:
3x3x3 "same" convolutions, stride 1, 16 or 32 output channels, bf16/fp16 channels-last, on CUDA or under
``TRITON_INTERPRET=1``) where it measured faster than cuDNN (not for 16 output channels from <= 32 input channels),
then ``"reference"`` (``aten.convolution_backward``, any convolution). ``backend=`` or ``HMEDN_BACKEND_CONV_WGRAD``
(``HMEDN_BACKEND``) force one. The input gradient is always ATen's (cuDNN).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from hmedn_fast.ops.dispatch import choose_backend, triton_unavailable


def _triton_unavailable(grad: Tensor, inp: Tensor, weight: Tensor, stride, padding, dilation, groups) -> str | None:
    reason = triton_unavailable(grad, inp)
    if reason is not None:
        return reason
    from hmedn_fast.ops.triton.conv_wgrad import unsupported

    return unsupported(grad, inp, weight, stride, padding, dilation, groups)


def prefers_triton(c_in: int, c_out: int) -> bool:
    """Whether the Triton weight gradient beat cuDNN in the H200 sweep (``benchmarks/results/conv_wgrad_H200.txt``):
    every shape except 16 output channels from <= 32 input channels (there cuDNN was as fast or faster); 1.2-2.0x
    elsewhere."""
    return not (c_out == 16 and c_in <= 32)


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
        backend: weight-gradient backend, None (automatic), ``"triton"`` or ``"reference"``.
    Returns:
        ``(grad_input, grad_weight)``: grad_input in inp's dtype, grad_weight in weight's dtype (the Triton
        kernel accumulates in float32 and rounds once to it; ATen's in grad's dtype first).
    """
    dt = grad.dtype
    x, w = inp.to(dt), weight.to(dt)
    candidates = [("triton", lambda: _triton_unavailable(grad, x, w, stride, padding, dilation, groups)),
                  ("reference", lambda: None)]
    if not prefers_triton(w.shape[1], w.shape[0]):
        candidates.reverse()  # automatic choice: ATen; forcing "triton" still takes the kernel
    use_triton = need_weight and choose_backend("conv_wgrad", backend, candidates) == "triton"
    gi = gw = None
    if need_input or (need_weight and not use_triton):
        gi, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, list(stride), list(padding), list(dilation), False, [0] * (weight.ndim - 2), groups,
            [need_input, need_weight and not use_triton, False])
    if use_triton:
        from hmedn_fast.ops.triton.conv_wgrad import conv3x3_wgrad

        gw = conv3x3_wgrad(grad, x, dilation[0])
    return (gi.to(inp.dtype) if gi is not None else None), (gw.to(weight.dtype) if gw is not None else None)


__all__ = ["conv_backward", "prefers_triton"]
