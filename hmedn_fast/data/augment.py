"""Training augmentation on torch tensors, on whatever device they live on (the GPU when the model is there).

Each sample is augmented from its own seed (:func:`hmedn_fast.data.sampling.sample_seed`), drawn on the
CPU with numpy, so the result does not depend on the device, the batch composition or the number of
data-parallel ranks. Transforms, in this order:

- flips: each spatial axis with probability 1/2 (image and label);
- 90-degree rotations: ``k`` in {0, 1, 2, 3} in a plane chosen among the pairs of spatial axes of equal size
  (patches keep their shape, so a batch stays stackable); no rotation when no two axes are equal;
- slice-order reversal (2D slice stacks, ``slice_groups`` set): with probability 1/2 the ``slice_groups``
  adjacent slices of each modality (channels are modality-major) are reversed, the paper's 2D flip of the
  axial slice order;
- intensity: ``image * s + t`` with ``s ~ U(scale)`` and ``t ~ U(shift)`` per channel.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation options (validated on construction; ValueError names the option).

    Attributes:
        flip: random flips of every spatial axis.
        rotate90: random 90-degree rotations in planes of equal size.
        scale: (low, high) range of the per-channel intensity factor; (1, 1) disables it.
        shift: (low, high) range of the per-channel intensity offset; (0, 0) disables it.
        slice_groups: for 2D slice stacks, the number of adjacent slices per modality; enables the random
            reversal of the slice order. None for other data.
    """

    flip: bool = True
    rotate90: bool = True
    scale: tuple[float, float] = (0.9, 1.1)
    shift: tuple[float, float] = (-0.1, 0.1)
    slice_groups: int | None = None

    def __post_init__(self) -> None:
        for name in ("flip", "rotate90"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("scale", "shift"):
            value = getattr(self, name)
            if (not isinstance(value, (tuple, list)) or len(value) != 2
                    or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in value) or value[0] > value[1]):
                raise ValueError(f"{name} must be a (low, high) pair of finite numbers with low <= high, got {value!r}")
        if self.scale[0] <= 0:
            raise ValueError(f"scale must be positive, got {self.scale!r}")
        if self.slice_groups is not None and (isinstance(self.slice_groups, bool)
                                              or not isinstance(self.slice_groups, int) or self.slice_groups < 1):
            raise ValueError(f"slice_groups must be a positive int or None, got {self.slice_groups!r}")


def augment_sample(image: Tensor, label: Tensor, seed: int, config: AugmentConfig) -> tuple[Tensor, Tensor]:
    """Augment one sample.

    Args:
        image: (C, *spatial) float tensor.
        label: (*spatial) integer tensor on the same device.
        seed: the sample's seed.
        config: options.
    Returns:
        (image, label) with the same shapes and dtypes (new tensors).
    """
    if image.ndim != label.ndim + 1 or image.shape[1:] != label.shape:
        raise ValueError(f"image must be (C, *spatial) and label (*spatial) of the same spatial shape, got "
                         f"{tuple(image.shape)} and {tuple(label.shape)}")
    rng = np.random.default_rng(seed)
    nd = label.ndim
    flips = rng.random(nd) < 0.5
    k = int(rng.integers(4))
    planes = [p for p in itertools.combinations(range(nd), 2) if label.shape[p[0]] == label.shape[p[1]]]
    plane = planes[int(rng.integers(len(planes)))] if planes else None
    reverse_slices = rng.random() < 0.5
    c = image.shape[0]
    scale = rng.uniform(*config.scale, size=c)
    shift = rng.uniform(*config.shift, size=c)

    if config.flip and flips.any():
        axes = [int(a) for a in np.flatnonzero(flips)]
        image, label = image.flip([a + 1 for a in axes]), label.flip(axes)
    if config.rotate90 and plane is not None and k:
        image = torch.rot90(image, k, [plane[0] + 1, plane[1] + 1])
        label = torch.rot90(label, k, list(plane))
    if config.slice_groups is not None and reverse_slices:
        g = config.slice_groups
        if c % g:
            raise ValueError(f"slice_groups={g} must divide the channel count {c}")
        image = image.reshape(c // g, g, *image.shape[1:]).flip(1).reshape(image.shape)
    if config.scale != (1, 1) or config.shift != (0, 0):
        view = (c,) + (1,) * nd
        s = torch.as_tensor(scale, dtype=image.dtype, device=image.device).view(view)
        t = torch.as_tensor(shift, dtype=image.dtype, device=image.device).view(view)
        image = image * s + t
    return image.contiguous(), label.contiguous()


def augment_batch(images: Tensor, labels: Tensor, seeds: Sequence[int], config: AugmentConfig) -> tuple[Tensor, Tensor]:
    """Augment a batch sample by sample: images (N, C, *spatial) float, labels (N, *spatial) integer, one seed
    per sample -> new (images, labels) of the same shapes, dtypes and device."""
    if len(seeds) != images.shape[0] or labels.shape[0] != images.shape[0]:
        raise ValueError(f"need one seed and one label per image: images {tuple(images.shape)}, labels "
                         f"{tuple(labels.shape)}, {len(seeds)} seeds")
    pairs = [augment_sample(i, l, int(s), config) for i, l, s in zip(images, labels, seeds)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
