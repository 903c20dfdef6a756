"""The output container every hmedn_fast model returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SegmentationOutput:
    """What a segmentation model returns.

    Attributes:
        seg: (N, K, *spatial) class logits at the input's spatial size (float).
        contour: (N, 1, *spatial) contour-regression logits (apply a sigmoid for probabilities), or
            None when the model has no contour head.
        aux: deep-supervision logits, each (N, K, *its own spatial size); the spatial size may be an
            integer fraction of the input's (e.g. the HR pathway head at stage 3 is 1/4 of it).
            Always filled when the model has such heads; losses decide whether to use them.
        aux_scales: for each ``aux`` map, its integer downsampling factor per spatial axis relative to
            ``seg`` (aux voxel ``j`` covers input voxels ``[j * f, (j + 1) * f)``); empty when unknown. For
            an input size that is not a multiple of the network's, an aux map covers ``ceil(size / f)``
            cells, the last one partly outside the input.
    """

    seg: torch.Tensor
    contour: torch.Tensor | None = None
    aux: list[torch.Tensor] = field(default_factory=list)
    aux_scales: list[tuple[int, ...]] = field(default_factory=list)
