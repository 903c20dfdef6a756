"""Common frame of every hmedn_fast model: input checks, padding to the network's size multiple, cropping
back, the optional contour head, and initialisation."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..nn.fusion import fuse_for_inference
from ..nn.layers import ConvNormReLU, NormSpec, check_positive_int, check_spatial_dims, conv, xavier_init
from .output import SegmentationOutput

INITS = ("xavier", "default")


class SegmentationModel(nn.Module):
    """Base class: subclasses build their layers, then call :meth:`_finish`, and implement
    :meth:`forward_padded` on inputs whose spatial sizes are multiples of ``size_multiple``.

    ``forward(x)`` accepts any spatial size: it zero-pads each spatial axis at its end to the next multiple of
    ``size_multiple``, runs the network, and crops ``seg`` and ``contour`` back to the input's size; each
    ``aux`` map at a 1/f resolution is cropped to ``ceil(size / f)``.
    """

    size_multiple: int = 1

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        check_positive_int("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + structures), got {num_classes}")
        self.in_channels, self.num_classes, self.spatial_dims = in_channels, num_classes, spatial_dims

    def _finish(self, feature_channels: int, contour: bool, norm: NormSpec, init: str) -> None:
        """Add the contour head on the final ``feature_channels`` features and initialise all weights."""
        self.contour_head = (nn.Sequential(ConvNormReLU(self.spatial_dims, feature_channels, feature_channels, 3,
                                                        norm_spec=norm),
                                           conv(self.spatial_dims, feature_channels, 1, 1, bias=True))
                             if contour else None)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "xavier":
            xavier_init(self)

    def fuse_for_inference(self) -> "SegmentationModel":
        """A fused eval-mode copy (BatchNorm folded into the convolutions), equal to ``self.eval()``'s outputs;
        ``self`` is unchanged. See :func:`hmedn_fast.nn.fusion.fuse_for_inference`."""
        return fuse_for_inference(self)

    def forward_padded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Return (features for the contour head, seg logits, aux logits) for a padded input."""
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        """Raise TypeError/ValueError when ``x`` is not a (N, in_channels, *spatial) float tensor."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"input must have {self.spatial_dims + 2} dims (N, C, {'D, ' if self.spatial_dims == 3 else ''}"
                             f"H, W) for this {self.spatial_dims}D model (spatial_dims={self.spatial_dims}), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the model expects in_channels={self.in_channels}")
        if x.shape[0] == 0 or any(s == 0 for s in x.shape[2:]):
            raise ValueError(f"input must be non-empty, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        """Segment ``x`` (N, in_channels, *spatial) float -> :class:`SegmentationOutput` (float logits)."""
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            self.check_input(x)
        size = x.shape[2:]
        m = self.size_multiple
        pad = []
        for s in reversed(size):
            pad += [0, (m - s % m) % m]
        xp = F.pad(x, pad) if any(pad) else x
        feats, seg, aux = self.forward_padded(xp)
        contour = self.contour_head(feats) if self.contour_head is not None else None
        scales = [tuple(int(p) // int(a) for p, a in zip(xp.shape[2:], t.shape[2:])) for t in aux]
        return SegmentationOutput(seg=_crop(seg, size), contour=_crop(contour, size) if contour is not None else None,
                                  aux=[_crop_scaled(a, size, xp.shape[2:]) for a in aux], aux_scales=scales)


def _crop(t: torch.Tensor, size) -> torch.Tensor:
    if tuple(t.shape[2:]) == tuple(size):
        return t
    idx = (slice(None), slice(None)) + tuple(slice(0, s) for s in size)
    return t[idx]


def _crop_scaled(t: torch.Tensor, size, padded_size) -> torch.Tensor:
    target = [math.ceil(s * a / p) for s, a, p in zip(size, t.shape[2:], padded_size)]
    return _crop(t, target)
