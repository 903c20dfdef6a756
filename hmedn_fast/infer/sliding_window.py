"""Sliding-window inference over volumes of any size, and the image -> label map pipeline built on it.

Windows of ``roi_size`` are placed along each spatial axis at ``0, step, 2 step, ...`` with
``step = max(1, floor(roi * (1 - overlap)))``, plus one window ending at the last voxel, so every voxel is
covered. Each batch of windows runs through an engine (:mod:`hmedn_fast.infer.engines`); its softmax
probabilities (and sigmoid contour) are multiplied by an importance map and added into accumulators, which
are divided by the summed importance at the end. With the Gaussian importance map (``sigma = sigma_scale *
roi`` per axis, peak 1, floored at ``MIN_IMPORTANCE``), window centres dominate and seams fade out.

Memory: only one batch of windows is in flight on the engine's device; the accumulators (K + 1 or K + 2
float32 channels of the volume) live on ``accumulate_device`` (the engine's device by default; pass "cpu" to
keep a large volume's accumulators off the GPU).
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..models.base import SegmentationModel
from .engines import EagerEngine, Engine

MIN_IMPORTANCE = 1e-3
IMPORTANCE_MODES = ("gaussian", "constant")


class SlidingWindowOutput(NamedTuple):
    """Result of :func:`sliding_window_inference`.

    Attributes:
        probabilities: (N, K, *spatial) float32 class probabilities (they sum to 1 over K).
        contour: (N, 1, *spatial) float32 contour probabilities (sigmoid), or None without a contour head.
    """

    probabilities: torch.Tensor
    contour: torch.Tensor | None


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis of length ``size`` (module doc); ``[0]`` when ``roi >= size``."""
    if roi >= size:
        return [0]
    step = max(1, int(roi * (1.0 - overlap)))
    return list(range(0, size - roi, step)) + [size - roi]


def gaussian_importance(roi_size: Sequence[int], sigma_scale: float = 0.125,
                        device: str | torch.device | None = None) -> torch.Tensor:
    """Separable Gaussian importance map (*roi_size) float32: per axis ``exp(-(i - (r - 1) / 2)^2 / (2 sigma^2))``
    with ``sigma = sigma_scale * r``; the product is scaled to a peak of 1 and floored at ``MIN_IMPORTANCE``."""
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale!r}")
    w = torch.ones((), dtype=torch.float64)
    for r in roi_size:
        i = torch.arange(r, dtype=torch.float64)
        g = torch.exp(-((i - (r - 1) / 2) ** 2) / (2 * (sigma_scale * r) ** 2))
        w = w[..., None] * g
    return (w / w.max()).clamp_min(MIN_IMPORTANCE).to(device=device, dtype=torch.float32)


def as_engine(engine: Engine | SegmentationModel) -> Engine:
    """``engine`` itself, or an :class:`EagerEngine` around a model; TypeError for anything else."""
    if isinstance(engine, Engine):
        return engine
    if isinstance(engine, SegmentationModel):
        return EagerEngine(engine)
    raise TypeError(f"engine must be an hmedn_fast Engine or SegmentationModel, got {type(engine).__name__}")


def _flip_sets(flips, spatial_dims: int) -> list[tuple[int, ...]]:
    if flips is None or flips is False:
        return [()]
    if flips is True:
        axes = range(spatial_dims)
        return [c for k in range(spatial_dims + 1) for c in itertools.combinations(axes, k)]
    sets = [tuple(f) for f in flips]
    if not sets or any(not all(isinstance(a, int) and 0 <= a < spatial_dims for a in f) or len(set(f)) != len(f)
                       for f in sets):
        raise ValueError(f"flips must be None, True or a non-empty list of tuples of spatial axes in "
                         f"[0, {spatial_dims}), e.g. [(), (0,), (1, 2)]; got {flips!r}")
    return sets


def _check_roi(roi_size, engine: Engine, spatial: tuple[int, ...]) -> tuple[int, ...]:
    d = engine.spatial_dims
    if roi_size is None:
        return engine.window if engine.window is not None else spatial
    roi = (roi_size,) * d if isinstance(roi_size, int) else tuple(roi_size)
    if len(roi) != d or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in roi):
        raise ValueError(f"roi_size must be a positive int or {d} positive ints, got {roi_size!r}")
    if engine.window is not None and roi != engine.window:
        raise ValueError(f"roi_size={roi} differs from the engine's fixed window {engine.window}")
    return roi


def _predict(engine: Engine, x: torch.Tensor, flips: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax / sigmoid of the engine's outputs, averaged over the flipped copies of ``x``."""
    seg_sum = contour_sum = None
    for f in flips:
        dims = [a + 2 for a in f]
        seg, contour = engine(x.flip(dims) if dims else x)
        seg = torch.softmax(seg.float(), 1)
        seg = seg.flip(dims) if dims else seg
        seg_sum = seg if seg_sum is None else seg_sum + seg
        if contour is not None:
            contour = torch.sigmoid(contour.float())
            contour = contour.flip(dims) if dims else contour
            contour_sum = contour if contour_sum is None else contour_sum + contour
    n = len(flips)
    return seg_sum / n, (contour_sum / n if contour_sum is not None else None)


def sliding_window_inference(image: torch.Tensor, engine: Engine | SegmentationModel,
                             roi_size: int | Sequence[int] | None = None, *, overlap: float = 0.5,
                             sw_batch_size: int = 4, importance: str = "gaussian", sigma_scale: float = 0.125,
                             flips: bool | Sequence[Sequence[int]] | None = None,
                             accumulate_device: str | torch.device | None = None,
                             progress: bool = False) -> SlidingWindowOutput:
    """Class (and contour) probabilities of ``image`` by importance-weighted sliding windows (module doc).

    Args:
        image: (N, in_channels, *spatial) floating tensor, any spatial size, any device (windows are moved to
            the engine's device one batch at a time).
        engine: an :class:`~hmedn_fast.infer.engines.Engine` or a :class:`SegmentationModel` (run eagerly).
        roi_size: window size (an int for all axes, or one per axis). Default: the engine's fixed window, or
            the whole volume. For engines that accept any size, a window larger than the volume is shrunk to
            it; for fixed-window engines the volume is zero-padded at its end up to the window and the result
            cropped back.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        sw_batch_size: windows per engine call (they may come from different items of the batch N).
        importance: "gaussian" or "constant" (plain averaging).
        sigma_scale: Gaussian sigma as a fraction of the window size.
        flips: test-time augmentation: None (off), True (every subset of the spatial axes, 2^d passes) or a
            list of tuples of spatial axes (0-based) to flip; the probabilities are averaged over them.
        accumulate_device: where the accumulators and the result live (default: the engine's device).
        progress: show a tqdm bar over window batches.

    Returns:
        :class:`SlidingWindowOutput` with float32 (N, K, *spatial) probabilities and (N, 1, *spatial) contour
        probabilities (or None), on ``accumulate_device``.

    Raises:
        TypeError: ``image`` is not a floating tensor, ``engine`` is not an engine or model.
        ValueError: wrong number of dims (e.g. a 3D volume for a 2D model), wrong channel count, empty or
            non-finite image, bad ``roi_size`` / ``overlap`` / ``sw_batch_size`` / ``importance`` / ``flips``.
    """
    engine = as_engine(engine)
    d = engine.spatial_dims
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError(f"image must be a floating-point torch.Tensor, got {getattr(image, 'dtype', type(image))}")
    if image.ndim != d + 2:
        raise ValueError(f"image must be (N, C, {'D, ' if d == 3 else ''}H, W) for this {d}D model "
                         f"(spatial_dims={d}), got shape {tuple(image.shape)}")
    if image.shape[1] != engine.in_channels:
        raise ValueError(f"image has {image.shape[1]} channels, the model expects in_channels={engine.in_channels}")
    if image.numel() == 0:
        raise ValueError(f"image must be non-empty, got shape {tuple(image.shape)}")
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image contains NaN or infinite values")
    if not (isinstance(overlap, (int, float)) and 0.0 <= overlap < 1.0):
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
    if engine.batch is not None:
        sw_batch_size = min(sw_batch_size, engine.batch)
    if importance not in IMPORTANCE_MODES:
        raise ValueError(f"importance must be one of {IMPORTANCE_MODES}, got {importance!r}")
    flip_sets = _flip_sets(flips, d)
    spatial = tuple(image.shape[2:])
    roi = _check_roi(roi_size, engine, spatial)
    if engine.window is not None:
        pad = [p for s, r in zip(reversed(spatial), reversed(roi)) for p in (0, max(r - s, 0))]
        image = F.pad(image, pad) if any(pad) else image
    else:
        roi = tuple(min(r, s) for r, s in zip(roi, spatial))
    padded = tuple(image.shape[2:])
    acc_device = torch.device(accumulate_device) if accumulate_device is not None else engine.device
    weight = (gaussian_importance(roi, sigma_scale, engine.device) if importance == "gaussian"
              else torch.ones(roi, device=engine.device))
    grid = [tuple(slice(s, s + r) for s, r in zip(starts, roi))
            for starts in itertools.product(*(window_starts(s, r, overlap) for s, r in zip(padded, roi)))]
    norm = torch.zeros(padded, device=acc_device)
    weight_acc = weight.to(acc_device)
    for sl in grid:
        norm[sl] += weight_acc
    n_items = image.shape[0]
    probs = torch.zeros((n_items, engine.num_classes) + padded, device=acc_device)
    contour = torch.zeros((n_items, 1) + padded, device=acc_device) if engine.has_contour else None
    windows = [(n, sl) for n in range(n_items) for sl in grid]
    batches = range(0, len(windows), sw_batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="windows", unit="batch", leave=False)
    for b in batches:
        chunk = windows[b:b + sw_batch_size]
        x = torch.stack([image[n][(slice(None),) + sl] for n, sl in chunk]).to(engine.device)
        seg_p, contour_p = _predict(engine, x, flip_sets)
        seg_p = (seg_p.to(engine.device) * weight).to(acc_device)
        if contour is not None:
            contour_p = (contour_p.to(engine.device) * weight).to(acc_device)
        for i, (n, sl) in enumerate(chunk):
            probs[n][(slice(None),) + sl] += seg_p[i]
            if contour is not None:
                contour[n][(slice(None),) + sl] += contour_p[i]
    crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)
    probs = (probs / norm)[crop]
    return SlidingWindowOutput(probs, (contour / norm)[crop] if contour is not None else None)


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds labels ``0 .. num_classes - 1`` (uint8 up to 256 classes)."""
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


def segment(image: np.ndarray | torch.Tensor, engine: Engine | SegmentationModel, *,
            roi_size: int | Sequence[int] | None = None, overlap: float = 0.5, sw_batch_size: int = 4,
            flips: bool | Sequence[Sequence[int]] | None = None, postprocess: bool = True, min_size: int = 64,
            slice_axis: int = 2, accumulate_device: str | torch.device | None = None,
            progress: bool = False) -> np.ndarray:
    """Label map of one normalised image: sliding window, argmax, then optional anatomical merging.

    Args:
        image: (C, *spatial) float array or tensor, already normalised (:func:`hmedn_fast.infer.io.normalize`).
            For a 3D engine, 3 spatial dims. For a 2D engine, either 2 spatial dims, or a 3D volume
            (C, X, Y, Z) segmented slice by slice along ``slice_axis`` with ``in_channels // C`` adjacent
            slices as channels (the paper's 5-slice input; :func:`hmedn_fast.data.slice_stack`'s order).
        engine: an engine or a :class:`SegmentationModel`.
        roi_size, overlap, sw_batch_size, flips, accumulate_device, progress: as :func:`sliding_window_inference`
            (for a 2D engine on a volume, windows of several slices share an engine call).
        postprocess: apply :func:`hmedn_fast.postprocess.anatomical_merge` (with ``min_size``).
        min_size: smallest isolated component kept by the merging, in voxels.
        slice_axis: spatial axis (0, 1, 2) a 2D engine slices a volume along.

    Returns:
        (*spatial) label map, dtype :func:`label_dtype` (uint8 for up to 256 classes), on the CPU.

    Raises:
        ValueError: channel counts that do not match the model, a 3D engine on a 2D image, a 2D engine on a
            volume whose channels do not divide ``in_channels`` into an odd slice count.
    """
    engine = as_engine(engine)
    x = torch.as_tensor(image)
    if not x.is_floating_point():
        raise TypeError(f"image must hold floating-point values, got dtype {x.dtype}")
    spatial_dims = x.ndim - 1
    slabs = engine.spatial_dims == 2 and spatial_dims == 3
    if slabs:
        channels = x.shape[0]
        slices, rest = divmod(engine.in_channels, channels)
        if rest or slices % 2 == 0:
            raise ValueError(f"a 2D model with in_channels={engine.in_channels} cannot take a {channels}-channel "
                             f"volume slice by slice (in_channels must be an odd multiple of the image's channels)")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
        from ..data.msd import slice_stack

        arr = x.cpu().numpy()
        stacks, _ = slice_stack(arr, np.zeros(arr.shape[1:], np.uint8), axis=slice_axis, slices=slices)
        batch = torch.from_numpy(stacks)
    elif spatial_dims != engine.spatial_dims:
        raise ValueError(f"image must be (C, *spatial) with {engine.spatial_dims} spatial dims for this "
                         f"{engine.spatial_dims}D model (spatial_dims={engine.spatial_dims}), got shape "
                         f"{tuple(x.shape)}")
    else:
        batch = x[None]
    out = sliding_window_inference(batch.float(), engine, roi_size, overlap=overlap, sw_batch_size=sw_batch_size,
                                   flips=flips, accumulate_device=accumulate_device, progress=progress)
    labels = out.probabilities.argmax(1).cpu().numpy().astype(label_dtype(engine.num_classes))
    labels = np.moveaxis(labels, 0, slice_axis) if slabs else labels[0]
    if postprocess:
        from ..postprocess import anatomical_merge

        labels = anatomical_merge(labels, min_size=min_size)
    return np.ascontiguousarray(labels)
