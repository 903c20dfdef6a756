"""Convolution geometry checks shared by the compiled convolution kernels (torch only: importable without Triton)."""
from __future__ import annotations

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
