"""Training data: loading a source into volumes, the deterministic train/validation split, 2D slice stacks,
and the patch dataset and batch sampler the trainer iterates over.

Sources (``data=`` of :func:`load_volumes`):

- ``"phantom"``: the synthetic phantom (:mod:`hmedn_fast.data.phantom`), 2D slabs of 5 slices or 3D volumes;
  its windowed intensities in [-1, 1] are already normalised.
- an MSD-layout folder (``imagesTr/`` + ``labelsTr/``, NIfTI): read by :mod:`hmedn_fast.data.msd`, which
  normalises every volume per channel (robust z-score).
- a PNG instance folder (``images/`` + ``labels/``): :mod:`hmedn_fast.data.png` (per-image z-score; labels
  background / interior / boundary).

A training sample is a pure function of ``(seed, epoch, index)`` (:func:`hmedn_fast.data.sampling.sample_seed`):
the case is drawn uniformly, then a patch with foreground oversampling; the trainer augments it on its device
from the same seed. Resuming needs only the epoch and the step, and ``R`` data-parallel ranks that split each
global batch see exactly the samples of one process.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from hmedn_fast.data.msd import find_msd_cases, load_msd_case, slice_stack
from hmedn_fast.data.phantom import make_phantom
from hmedn_fast.data.png import find_png_pairs, load_png_pair
from hmedn_fast.data.sampling import check_patch_size, sample_patch, sample_seed


class Volume(NamedTuple):
    """One case.

    Attributes:
        image: (C, *spatial) float32, normalised.
        label: (*spatial) uint8 class map.
        spacing: voxel size per spatial axis (mm for NIfTI, 1 for PNG).
        name: case name (unique within a source).
        source: where it came from (file path or ``phantom``), used in error messages.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...]
    name: str
    source: str


def load_volumes(data: str | Path, *, spatial_dims: int = 3, max_cases: int | None = None,
                 phantom_cases: int = 24, phantom_size: int = 64, seed: int = 0) -> list[Volume]:
    """Load every case of a source (see the module doc).

    Args:
        data: ``"phantom"``, an MSD folder or a PNG folder.
        spatial_dims: phantom only: 2 (5-slice slabs) or 3 (volumes).
        max_cases: keep the first ``max_cases`` cases in name order (None: all).
        phantom_cases, phantom_size, seed: phantom only: number of samples, size, generator seed.
    Raises:
        ValueError: unknown source, unreadable or inconsistent file (the message names it), bad option.
        FileNotFoundError: a missing folder or label file.
    """
    if max_cases is not None and (isinstance(max_cases, bool) or not isinstance(max_cases, int) or max_cases < 1):
        raise ValueError(f"max_cases must be a positive int or None, got {max_cases!r}")
    if str(data) == "phantom":
        n = phantom_cases if max_cases is None else min(phantom_cases, max_cases)
        ph = make_phantom(n, seed=seed, spatial_dims=spatial_dims, size=phantom_size)
        return [Volume(img, lab, tuple(ph.spacing), f"phantom_{i:04d}", "phantom")
                for i, (img, lab) in enumerate(zip(ph.images, ph.labels))]
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"data must be 'phantom' or an existing folder (MSD imagesTr/labelsTr or PNG "
                         f"images/labels), got {str(data)!r}")
    if (root / "imagesTr").is_dir():
        pairs = find_msd_cases(root)[:max_cases]
        out = []
        for image, label in pairs:
            v = load_msd_case(image, label)
            out.append(Volume(v.image, v.label, tuple(v.spacing), v.name, f"{label}"))
        return out
    if (root / "images").is_dir():
        out = []
        for image, label in find_png_pairs(root)[:max_cases]:
            s = load_png_pair(image, label)
            out.append(Volume(s.image, s.label, (1.0, 1.0), s.name, f"{label}"))
        return out
    raise ValueError(f"folder {root} is neither an MSD folder (imagesTr/, labelsTr/) nor a PNG folder "
                     f"(images/, labels/)")


def check_volumes(volumes: Sequence[Volume], num_classes: int, in_channels: int | None = None) -> None:
    """Raise ValueError naming the file of the first volume whose label holds a value ``>= num_classes`` or
    whose channel count differs from ``in_channels`` (when given)."""
    for v in volumes:
        top = int(v.label.max())
        if top >= num_classes:
            raise ValueError(f"label {v.source} holds value {top}, beyond num_classes={num_classes} "
                             f"(labels must lie in [0, {num_classes - 1}])")
        if in_channels is not None and v.image.shape[0] != in_channels:
            raise ValueError(f"image of {v.source} has {v.image.shape[0]} channel(s), the model expects "
                             f"in_channels={in_channels}")


def make_split(names: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[str]]:
    """Deterministic train/validation split of case ``names``: a seeded permutation of the sorted names, the
    first ``max(1, round(val_fraction * n))`` go to validation. Returns ``{"train": [...], "val": [...]}``,
    each sorted."""
    names = sorted(names)
    if len(set(names)) != len(names):
        raise ValueError("case names must be unique")
    if len(names) < 2:
        raise ValueError(f"need at least 2 cases to split into training and validation, got {len(names)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_val = min(max(1, round(val_fraction * len(names))), len(names) - 1)
    order = np.random.default_rng(seed).permutation(len(names))
    val = sorted(names[i] for i in order[:n_val])
    return {"train": sorted(set(names) - set(val)), "val": val}


def read_or_write_split(path: Path, names: Sequence[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """The split stored at ``path`` (``split.json`` of a run) if present, else a new one written there.

    Raises:
        ValueError: the stored split names cases the source does not hold.
    """
    if path.is_file():
        split = json.loads(path.read_text())
        missing = sorted((set(split["train"]) | set(split["val"])) - set(names))
        if missing:
            raise ValueError(f"split file {path} names cases absent from the data: {missing[:5]}")
        return {"train": list(split["train"]), "val": list(split["val"])}
    split = make_split(names, val_fraction, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed, "val_fraction": val_fraction, **split}, indent=1))
    return split


def to_slice_stacks(volumes: Sequence[Volume], slices: int = 5, axis: int = 2) -> list[Volume]:
    """2D samples of 3D volumes: ``slices`` adjacent slices along ``axis`` as channels (modality-major), the
    middle slice's label (:func:`hmedn_fast.data.msd.slice_stack`); names ``<case>:<slice>``."""
    out = []
    for v in volumes:
        if v.label.ndim != 3:
            raise ValueError(f"slice stacks need 3D volumes, {v.source} is {v.label.ndim}D")
        images, labels = slice_stack(v.image, v.label, axis=axis, slices=slices)
        spacing = tuple(s for d, s in enumerate(v.spacing) if d != axis)
        out += [Volume(img, lab, spacing, f"{v.name}:{i}", v.source) for i, (img, lab) in enumerate(zip(images, labels))]
    return out


def default_patch_size(volumes: Sequence[Volume], multiple: int = 16) -> tuple[int, ...]:
    """The smallest size covering every volume, each axis rounded up to ``multiple`` (whole-volume training)."""
    shapes = np.array([v.label.shape for v in volumes])
    return tuple(int(-(-s // multiple) * multiple) for s in shapes.max(0))


class PatchDataset(torch.utils.data.Dataset):
    """``samples_per_epoch`` random patches per epoch; item ``i`` of epoch ``e`` depends only on
    ``(seed, e, i)``. Call :meth:`set_epoch` before each epoch.

    Foreground oversampling: with probability ``foreground_prob`` the sample comes from a case (or slice)
    holding foreground, centred on a voxel of a uniformly chosen foreground class; otherwise the case and the
    patch position are uniform. (Choosing the case too matters for 2D slice stacks, many of which are empty.)

    Items: ``(image, label, seed)`` with image (C, *patch_size) float32, label (*patch_size) uint8 and the
    sample's seed (int) for augmentation.
    """

    def __init__(self, items: Sequence[Volume], patch_size: Sequence[int], samples_per_epoch: int, seed: int = 0,
                 foreground_prob: float = 0.33) -> None:
        if not items:
            raise ValueError("items must hold at least one volume")
        if not isinstance(samples_per_epoch, int) or samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be a positive int, got {samples_per_epoch!r}")
        if not 0.0 <= foreground_prob <= 1.0:
            raise ValueError(f"foreground_prob must be in [0, 1], got {foreground_prob!r}")
        self.items = list(items)
        self.patch_size = check_patch_size(patch_size, self.items[0].label.ndim)
        self.samples_per_epoch, self.seed, self.foreground_prob = samples_per_epoch, seed, foreground_prob
        self.foreground_items = np.flatnonzero([bool(v.label.any()) for v in self.items])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        seed = sample_seed(self.seed, self.epoch, index)
        rng = np.random.default_rng((seed, 0))  # the augmentation draws from default_rng(seed): another stream
        foreground = rng.random() < self.foreground_prob and self.foreground_items.size > 0
        pool = self.foreground_items if foreground else np.arange(len(self.items))
        item = self.items[int(pool[rng.integers(pool.size)])]
        image, label = sample_patch(item.image, item.label, self.patch_size, rng, float(foreground))
        return torch.from_numpy(image), torch.from_numpy(label), seed


class StepBatchSampler(torch.utils.data.Sampler):
    """Index batches of one epoch from step ``start_step`` on: global batch ``s`` covers sample indices
    ``[s * B * R, (s + 1) * B * R)`` of which rank ``r`` takes ``[.. + r * B, .. + (r + 1) * B)`` (B = per-rank
    batch, R = world size)."""

    def __init__(self, steps: int, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step must lie in [0, steps={steps}], got {start_step}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.steps, self.batch_size, self.start_step, self.rank, self.world_size = (
            steps, batch_size, start_step, rank, world_size)

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for step in range(self.start_step, self.steps):
            first = step * b * self.world_size + self.rank * b
            yield list(range(first, first + b))


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Stack ``(image, label, seed)`` items into (N, C, *spatial) float32, (N, *spatial) uint8 and the seeds."""
    return (torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]), [int(b[2]) for b in batch])
