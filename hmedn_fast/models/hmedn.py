"""DstNet, HRDN and HMEDN (2D and 3D): the distilling pathway, optionally bridged by an HR pathway, with an
optional contour-regression head."""
from __future__ import annotations

from typing import Sequence

import torch

from ..nn.layers import NormSpec
from ..nn.pathways import CHECKPOINT_MODES, DistillingPathway, HRPathway
from .base import SegmentationModel


class HMEDN(SegmentationModel):
    """High-resolution multi-scale encoder-decoder network and its ablations.

    Without ``hr_stage`` it is DstNet; with it, HRDN; with ``contour=True`` (and trained with
    :class:`hmedn_fast.losses.HMEDNLoss`), HMEDN.

    Args:
        in_channels: image channels (5 adjacent slices in 2D, 4 MRI modalities in 3D in the paper).
        num_classes: K, including background.
        spatial_dims: 2 or 3.
        widths: distilling-pathway channels per stage; ``len(widths) - 1`` downsamplings.
        growth_rates, num_layers: dense-block growth rate and layer count (per stage or one for all).
        hr_stage: paper numbering, 1 = full resolution (HRDN-L1) ... or None for no HR pathway.
        hr_channels: L, the HR pathway width.
        hr_blocks, hr_dilations: HR pathway block count and (d1, d2).
        contour: add the contour-regression head.
        norm: "batch" | "instance" | "group" | (name, kwargs).
        dropout: dropout at the end of each stage.
        init: "xavier" (paper) or "default" (PyTorch's).
        checkpoint: backward-memory mode of the HR pathway's blocks, "none" | "lean" | "blocks" | "auto"
            (see :class:`hmedn_fast.nn.HRPathway`); same gradients in every mode.

    Input (N, in_channels, *spatial), any size; output :class:`SegmentationOutput` with ``seg`` (N, K, *spatial),
    ``contour`` (N, 1, *spatial) or None, ``aux`` = 3 HED side logits (stages 1-3) and the HR head's logits.
    """

    def __init__(self, in_channels: int = 5, num_classes: int = 4, spatial_dims: int = 2,
                 widths: Sequence[int] = (32, 64, 128, 256, 512), growth_rates: int | Sequence[int] = 16,
                 num_layers: int | Sequence[int] = 4, hr_stage: int | None = None, hr_channels: int = 32,
                 hr_blocks: int = 9, hr_dilations: Sequence[int] = (2, 4), contour: bool = False,
                 norm: NormSpec = "batch", dropout: float = 0.0, init: str = "xavier",
                 checkpoint: str = "none") -> None:
        super().__init__(in_channels, num_classes, spatial_dims)
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
        depth = len(widths) - 1
        hr = None
        if hr_stage is not None:
            if isinstance(hr_stage, bool) or not isinstance(hr_stage, int) or not 1 <= hr_stage <= depth:
                raise ValueError(f"hr_stage must be an int in [1, {depth}] (1 = full resolution) or None, "
                                 f"got {hr_stage!r}")
            hr = HRPathway(widths[hr_stage - 1], hr_channels, hr_blocks, hr_dilations, num_classes, spatial_dims,
                           norm, checkpoint=checkpoint)
        self.size_multiple = 2 ** depth
        self.hr_stage = hr_stage
        self.net = DistillingPathway(in_channels, num_classes, widths, growth_rates, num_layers, spatial_dims, norm,
                                     dropout=dropout, hr_pathway=hr,
                                     hr_stage=None if hr_stage is None else hr_stage - 1)
        self._finish(widths[0], contour, norm, init)

    def forward_padded(self, x: torch.Tensor):
        return self.net(x)
