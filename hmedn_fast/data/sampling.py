"""Patch sampling for training: padding to the patch size, foreground-oversampled patch positions, and the
per-sample random seeds that make every sample a pure function of ``(seed, epoch, index)``.

Why seeds per sample: a training sample (its case, its patch position, its augmentation) depends only on
the run's seed, the epoch and the sample's global index in the epoch. Resuming a run therefore only needs
the position in the epoch, and data-parallel ranks that split a global batch draw exactly the samples one
process would (see :mod:`hmedn_fast.train.distributed`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of ``epoch`` of a run seeded with ``seed`` (all non-negative ints)."""
    for name, value in (("seed", seed), ("epoch", epoch), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def check_patch_size(patch_size: Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    """Validate ``patch_size`` (``spatial_dims`` positive ints) and return it as a tuple."""
    if (isinstance(patch_size, (str, bytes)) or not hasattr(patch_size, "__len__") or len(patch_size) != spatial_dims
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in patch_size)):
        raise ValueError(f"patch_size must be {spatial_dims} positive ints (one per spatial axis), got {patch_size!r}")
    return tuple(int(s) for s in patch_size)


def pad_to_size(image: np.ndarray, label: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``image`` (C, *spatial) and ``label`` (*spatial) symmetrically so every spatial axis is at least
    ``size``; axes already large enough are left alone.

    The image is padded with each channel's minimum (the background of a normalised scan), the label with 0.
    Returns new arrays (or the inputs when no padding is needed), dtypes kept.
    """
    size = check_patch_size(size, label.ndim)
    widths = []
    for have, want in zip(label.shape, size):
        extra = max(want - have, 0)
        widths.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in widths):
        return image, label
    out = np.empty((image.shape[0], *(s + a + b for s, (a, b) in zip(label.shape, widths))), dtype=image.dtype)
    for c, channel in enumerate(image):
        out[c] = np.pad(channel, widths, mode="constant", constant_values=channel.min())
    return out, np.pad(label, widths, mode="constant", constant_values=0)


def patch_start(label: np.ndarray, patch_size: Sequence[int], rng: np.random.Generator,
                foreground_prob: float) -> tuple[int, ...]:
    """Corner of a patch of ``patch_size`` inside ``label`` (*spatial, every axis >= the patch's).

    With probability ``foreground_prob`` (and when the label has foreground) a foreground class present in the
    label is chosen uniformly, then one of its voxels uniformly, and the patch is centred on it (shifted to
    stay inside); otherwise the corner is uniform over all valid positions. Choosing the class first keeps
    small structures from being drowned by large ones.
    """
    size = check_patch_size(patch_size, label.ndim)
    if any(p > s for p, s in zip(size, label.shape)):
        raise ValueError(f"patch_size {size} exceeds the (padded) label shape {label.shape}")
    if not 0.0 <= foreground_prob <= 1.0:
        raise ValueError(f"foreground_prob must be in [0, 1], got {foreground_prob!r}")
    high = [s - p for s, p in zip(label.shape, size)]
    if rng.random() < foreground_prob:
        classes = np.unique(label)
        classes = classes[classes > 0]
        if classes.size:
            k = classes[rng.integers(classes.size)]
            voxels = np.flatnonzero(label == k)
            center = np.unravel_index(voxels[rng.integers(voxels.size)], label.shape)
            return tuple(int(min(max(c - p // 2, 0), h)) for c, p, h in zip(center, size, high))
    return tuple(int(rng.integers(h + 1)) for h in high)


def sample_patch(image: np.ndarray, label: np.ndarray, patch_size: Sequence[int], rng: np.random.Generator,
                 foreground_prob: float = 0.33) -> tuple[np.ndarray, np.ndarray]:
    """Pad to ``patch_size`` if needed, then crop one patch (see :func:`patch_start`).

    Args:
        image: (C, *spatial) float array.
        label: (*spatial) integer array.
        patch_size: one size per spatial axis.
        rng: numpy generator the position is drawn from.
        foreground_prob: probability of centring the patch on a foreground voxel.
    Returns:
        image patch (C, *patch_size) and label patch (*patch_size), contiguous copies.
    """
    if image.ndim != label.ndim + 1 or image.shape[1:] != label.shape:
        raise ValueError(f"image must be (C, *spatial) and label (*spatial) of the same spatial shape, got "
                         f"{image.shape} and {label.shape}")
    image, label = pad_to_size(image, label, patch_size)
    start = patch_start(label, patch_size, rng, foreground_prob)
    box = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
    return np.ascontiguousarray(image[(slice(None), *box)]), np.ascontiguousarray(label[box])
