"""Convolution geometry shared by the compiled convolution kernels: the 3x3x3 "same" check and the taps-first weight
layout (torch only: importable without Triton)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def same_3x3_geometry_unsupported(inp: Tensor, weight: Tensor, stride, padding, dilation,
                                  groups: int) -> str | None:
    """Why a convolution is not a 3D 3x3x3 "same" one (stride 1, one dilation with padding = dilation, groups 1),
    or None."""
    if inp.ndim != 5 or weight.ndim != 5 or tuple(weight.shape[2:]) != (3, 3, 3):
        return "a 3D convolution with a 3x3x3 kernel"
    if groups != 1 or tuple(stride) != (1, 1, 1):
        return "groups 1 and stride 1"
    d = tuple(dilation)
    if len(set(d)) != 1 or tuple(padding) != d:
        return "padding equal to one dilation for every axis ('same' output)"
    return None


def pack_taps(weight: Tensor, dtype: torch.dtype, in_first: bool) -> Tensor:
    """A (C_out, C_in, 3, 3, 3) weight (any strides, any floating dtype) as the kernels' B operand: (27, C_out, C_in),
    or (27, C_in, C_out) with ``in_first``, contiguous in ``dtype``, tap = 9 kd + 3 kh + kw. One copy rounds and
    rearranges it (autocast's cast and a ``.contiguous()`` were two kernels); no autograd history."""
    order = (2, 3, 4, 1, 0) if in_first else (2, 3, 4, 0, 1)
    taps = weight.permute(order).reshape(27, weight.shape[order[3]], weight.shape[order[4]])  # a view if it can be
    with torch.no_grad():
        return torch.empty(taps.shape, dtype=dtype, device=weight.device).copy_(taps)


def pack_taps_many(weights: Sequence[Tensor], dtype: torch.dtype, in_first: bool) -> Tensor:
    """:func:`pack_taps` of several weights of one shape at once: (n, 27, C_out, C_in) (or (n, 27, C_in, C_out) with
    ``in_first``): the stack (on CUDA one device-to-device memcpy per weight) and one rounding, rearranging copy for
    all, instead of one rearranging copy per weight (0.09 vs 0.13 ms for a pathway step's packs on an H200, stop 36)."""
    order = (0, 3, 4, 5, 2, 1) if in_first else (0, 3, 4, 5, 1, 2)
    stacked = torch.stack([w.detach() for w in weights])  # (n, C_out, C_in, 3, 3, 3)
    taps = stacked.permute(order).reshape(len(weights), 27, stacked.shape[order[4]], stacked.shape[order[5]])
    return torch.empty(taps.shape, dtype=dtype, device=stacked.device).copy_(taps)


class TapPacks:
    """The 3x3x3 weights of several convolutions packed for one training step (forward and backward) as the CUDA
    kernel's B operands: the forward's layout at construction, the input gradient's on first use (in backward), each
    by :func:`pack_taps_many`. Pack again every step: the packs do not follow later changes of the weights.

    Args:
        weights: (C_out, C_in, 3, 3, 3) floating-point tensors of one shape (e.g. the HR pathway's block weights).
        dtype: the compute dtype (bf16 or fp16) the kernels run in.
    """

    def __init__(self, weights: Sequence[Tensor], dtype: torch.dtype) -> None:
        self.weights, self.dtype = list(weights), dtype
        self.forward = pack_taps_many(self.weights, dtype, in_first=False)
        self._input_grad: Tensor | None = None

    def input_grad(self, i: int) -> Tensor:
        """Weight ``i`` packed for the input gradient ((27, C_in, C_out), :func:`pack_taps` with ``in_first``)."""
        if self._input_grad is None:
            self._input_grad = pack_taps_many(self.weights, self.dtype, in_first=True)
        return self._input_grad[i]
