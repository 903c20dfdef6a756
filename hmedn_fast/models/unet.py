"""The plain U-Net baseline (2D [21] and 3D [30])."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..nn.layers import ConvNormReLU, NormSpec, conv, conv_transpose, max_pool
from .base import SegmentationModel


class UNet(SegmentationModel):
    """U-Net: two conv3 + norm + ReLU per stage, 2x max pooling, 2x2 transposed-conv upsampling,
    concatenated skips, a 1x1 logit head.

    Args:
        in_channels, num_classes, spatial_dims: as every model.
        widths: channels per stage (``len(widths) - 1`` downsamplings).
        contour, norm, init: as :class:`hmedn_fast.models.HMEDN`.
    """

    def __init__(self, in_channels: int = 5, num_classes: int = 4, spatial_dims: int = 2,
                 widths: Sequence[int] = (64, 128, 256, 512, 1024), contour: bool = False,
                 norm: NormSpec = "batch", init: str = "xavier") -> None:
        super().__init__(in_channels, num_classes, spatial_dims)
        if len(widths) < 2:
            raise ValueError(f"widths needs at least 2 stages, got {widths!r}")
        depth = len(widths) - 1
        self.size_multiple = 2 ** depth

        def double(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(ConvNormReLU(spatial_dims, cin, cout, 3, norm_spec=norm),
                                 ConvNormReLU(spatial_dims, cout, cout, 3, norm_spec=norm))

        self.pool = max_pool(spatial_dims)
        self.enc = nn.ModuleList(double(in_channels if s == 0 else widths[s - 1], widths[s]) for s in range(depth + 1))
        self.up = nn.ModuleList(conv_transpose(spatial_dims, widths[s + 1], widths[s], bias=True) for s in range(depth))
        self.dec = nn.ModuleList(double(2 * widths[s], widths[s]) for s in range(depth))
        self.head = conv(spatial_dims, widths[0], num_classes, 1, bias=True)
        self._finish(widths[0], contour, norm, init)

    def forward_padded(self, x: torch.Tensor):
        skips = []
        for s, enc in enumerate(self.enc):
            x = enc(x if s == 0 else self.pool(x))
            skips.append(x)
        for s in reversed(range(len(self.dec))):
            x = self.dec[s](torch.cat([self.up[s](x), skips[s]], 1))
        return x, self.head(x), []
