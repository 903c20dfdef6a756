"""Small factories shared by every block: convolutions, norms and pooling for 2D and 3D."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.upsample import upsample_linear
from .lean import norm_relu

NormSpec = Union[str, tuple]
NORMS = ("batch", "instance", "group")


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3) or isinstance(spatial_dims, bool):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def conv(spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1,
         stride: int = 1, bias: bool = False) -> nn.Module:
    """Conv2d/Conv3d with 'same' padding for odd kernels (padding = dilation * (kernel_size - 1) / 2)."""
    cls = nn.Conv2d if check_spatial_dims(spatial_dims) == 2 else nn.Conv3d
    return cls(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
               padding=dilation * (kernel_size - 1) // 2, bias=bias)


def conv_transpose(spatial_dims: int, in_channels: int, out_channels: int, bias: bool = False) -> nn.Module:
    """A stride-2, kernel-2 transposed convolution (exact 2x upsampling)."""
    cls = nn.ConvTranspose2d if check_spatial_dims(spatial_dims) == 2 else nn.ConvTranspose3d
    return cls(in_channels, out_channels, kernel_size=2, stride=2, bias=bias)


def max_pool(spatial_dims: int) -> nn.Module:
    """A 2x max pooling (:class:`MaxPool`) for 2D or 3D inputs."""
    return MaxPool(check_spatial_dims(spatial_dims))


class MaxPool(nn.Module):
    """``nn.MaxPool2d(2)`` / ``nn.MaxPool3d(2)`` whose backward keeps one byte per output element (the argmax's
    offset in its window) and not the input. PyTorch's keeps int64 indices and the input, which its backward reads
    for its shape and layout only, so a pooled tensor that nothing else saves (the distilling pathway's first-stage
    output when that stage is recomputed: hmedn_3d_l2 at 128^3 in bf16, 64 MiB) stays alive through the whole
    backward. Same outputs and gradients.

    Shapes: (N, C, *spatial) -> (N, C, *(s // 2 for s in spatial)), any float dtype, either layout."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"MaxPool({self.spatial_dims}D) expects a (N, C, *spatial) tensor with "
                             f"{self.spatial_dims} spatial axes, got shape {tuple(x.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxPoolIndices.apply(x)
        return _pool(x)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, kernel_size=2, stride=2"


class _MaxPoolIndices(torch.autograd.Function):
    """2x max pooling that saves, per output element, the argmax's offset inside its 2x2(x2) window as one byte
    (torch's flat int64 indices are rebuilt from it in backward) and the input's geometry (not the input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y, indices = _pool(x, return_indices=True)
        ctx.save_for_backward(_window_offsets(indices.to(torch.int32), x.shape[2:]))
        ctx.geometry = (x.shape, x.stride(), x.dtype, x.device)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        offsets, = ctx.saved_tensors
        shape, stride, dtype, device = ctx.geometry
        like = torch.empty_strided(shape, stride, dtype=dtype, device=device)  # shape and layout only, never read
        k = [2] * (len(shape) - 2)
        backward = (torch.ops.aten.max_pool2d_with_indices_backward if len(shape) == 4
                    else torch.ops.aten.max_pool3d_with_indices_backward)
        return backward(grad.to(dtype), like, k, k, [0] * len(k), [1] * len(k), False,
                        _flat_indices(offsets, shape[2:]))


def _pool(x: torch.Tensor, **kwargs):
    """2x max pooling of a (N, C, H, W) or (N, C, D, H, W) tensor."""
    return (F.max_pool2d if x.ndim == 4 else F.max_pool3d)(x, 2, **kwargs)


def _window_offsets(indices: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Flat argmax indices into each (N, C) plane of an input of spatial ``size`` -> the argmax's offset in its 2x
    window, ``sum_i (coordinate_i % 2) * 2 ** (n - 1 - i)`` (uint8)."""
    offset, rest = torch.zeros_like(indices, dtype=torch.uint8), indices
    for i, extent in enumerate(reversed(size)):
        offset += ((rest % extent) % 2).to(torch.uint8) << i
        rest = rest // extent
    return offset


def _flat_indices(offsets: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`_window_offsets`: int64 flat indices as torch's pooling returns them (the window of
    output element ``o`` starts at input coordinate ``2 o`` along every axis)."""
    n = len(size)
    flat = torch.zeros_like(offsets, dtype=torch.int64)  # the offsets' (the output's) layout
    for i, extent in enumerate(size):
        shape = [1] * (n + 2)
        shape[2 + i] = offsets.shape[2 + i]
        coord = 2 * torch.arange(offsets.shape[2 + i], device=offsets.device).view(shape)
        coord = coord + ((offsets >> (n - 1 - i)) & 1).to(torch.int64)
        flat.mul_(extent).add_(coord)
    return flat


def dropout(spatial_dims: int, p: float) -> nn.Module:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p!r}")
    if p == 0.0:
        return nn.Identity()
    return nn.Dropout2d(p) if check_spatial_dims(spatial_dims) == 2 else nn.Dropout3d(p)


def group_count(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= max_groups that divides ``channels``."""
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def norm(spec: NormSpec, spatial_dims: int, channels: int) -> nn.Module:
    """A normalisation layer.

    Args:
        spec: "batch", "instance" (affine, no running stats) or "group" (up to 8 groups dividing the channel
            count); or a tuple ``("group", {"num_groups": G})`` / ``(name, kwargs)`` passing keyword arguments.
        spatial_dims: 2 or 3.
        channels: number of channels normalised.
    """
    name, kwargs = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]) if len(spec) > 1 else {})
    if name not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (or a (name, kwargs) tuple), got {spec!r}")
    check_spatial_dims(spatial_dims)
    if name == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels, **kwargs)
    if name == "instance":
        kwargs.setdefault("affine", True)
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, **kwargs)
    groups = kwargs.pop("num_groups", group_count(channels))
    if channels % groups:
        raise ValueError(f"group norm: num_groups={groups} does not divide channels={channels}")
    return nn.GroupNorm(groups, channels, **kwargs)


class ConvNormReLU(nn.Sequential):
    """conv -> norm -> ReLU (post-activation), 'same' padding: ``Sequential(conv, norm)`` whose forward runs the
    norm + ReLU as one :func:`hmedn_fast.ops.norm_act.norm_act` call (fused Triton kernels where they win, see its
    automatic choice)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 dilation: int = 1, norm_spec: NormSpec = "batch") -> None:
        super().__init__(conv(spatial_dims, in_channels, out_channels, kernel_size, dilation),
                         norm(norm_spec, spatial_dims, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_relu(self[1], self[0](x))


def xavier_init(module: nn.Module) -> nn.Module:
    """Xavier-uniform weights for every (transposed) convolution, zero biases, unit/zero norm affine
    parameters: the paper's initialisation ([46], Glorot & Bengio)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm2d, nn.InstanceNorm3d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return module


def upsample_to(x: torch.Tensor, size) -> torch.Tensor:
    """(Bi/tri)linear resize of (N, C, *spatial) logits or features to ``size`` (align_corners=False) through
    :func:`hmedn_fast.ops.upsample.upsample_linear` (in training with integer factors on CUDA: a gradient without
    atomics; else ``F.interpolate``)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return upsample_linear(x, size)
