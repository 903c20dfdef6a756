"""DilNet1-3 (paper IV-A2, Fig. 3): full-resolution dilated residual networks without downsampling."""
from __future__ import annotations

from typing import Sequence

import torch

from ..nn.layers import NormSpec
from ..nn.pathways import HRPathway
from .base import SegmentationModel


class DilNet(SegmentationModel):
    """A plain (not densely connected) stack of residual dilated blocks at full resolution.

    Args:
        in_channels, num_classes, spatial_dims: as every model.
        channels: width of the blocks.
        num_blocks: 9 (DilNet1, DilNet2) or 6 (DilNet3).
        dilations: (3, 5) for DilNet1/3, (2, 4) for DilNet2.
        contour, norm, init, checkpoint: as :class:`hmedn_fast.models.HMEDN`.

    ``receptive_field`` reports the extent of the input one output voxel sees.
    """

    def __init__(self, in_channels: int = 5, num_classes: int = 4, spatial_dims: int = 2, channels: int = 64,
                 num_blocks: int = 9, dilations: Sequence[int] = (3, 5), contour: bool = False,
                 norm: NormSpec = "batch", init: str = "xavier", checkpoint: str = "none") -> None:
        super().__init__(in_channels, num_classes, spatial_dims)
        self.net = HRPathway(in_channels, channels, num_blocks, dilations, num_classes, spatial_dims, norm,
                             dense=False, checkpoint=checkpoint)
        self._finish(channels, contour, norm, init)

    @property
    def receptive_field(self) -> int:
        return self.net.receptive_field

    def forward_padded(self, x: torch.Tensor):
        feats, logits = self.net(x)
        return feats, logits, []
