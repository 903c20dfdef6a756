"""Reader for Medical Segmentation Decathlon (MSD) layout folders and 2D slice stacks made from them.

Layout: ``ROOT/imagesTr/<case>.nii[.gz]`` with a label of the same name in ``ROOT/labelsTr/``. Hidden
files (``._*`` left by macOS archives) are skipped. Images are 3D (one channel) or 4D with the modalities
on the last axis (MSD convention); labels are 3D integer maps (0 background, 1..K-1 structures).

Intensity normalisation (per volume and per channel): clip to the 0.5 and 99.5 percentiles, then subtract
the mean and divide by the standard deviation (a constant channel becomes all zeros).

2D samples follow the paper's input: ``slices`` adjacent slices along ``axis`` stacked as channels
(modality-major: all slices of channel 0, then of channel 1, ...), the label being the middle slice's.
Neighbours beyond the first / last slice repeat the edge slice.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Sequence

import nibabel as nib
import numpy as np
import torch
from .files import pair_with_labels

_SUFFIXES = (".nii.gz", ".nii")


class MSDVolume(NamedTuple):
    """One case.

    Attributes:
        image: (M, X, Y, Z) float32, normalised per channel (M = 1 for single-modality data).
        label: (X, Y, Z) uint8 (labels above 255 are refused).
        spacing: voxel size in mm along X, Y, Z.
        name: the case's file name without suffix.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    name: str


def _case_name(path: Path) -> str:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def find_msd_cases(root: str | Path) -> list[tuple[Path, Path]]:
    """Sorted ``(image_path, label_path)`` pairs of ``root``'s ``imagesTr`` / ``labelsTr``.

    Raises:
        FileNotFoundError: ``root`` or ``root/imagesTr`` is missing, or an image has no label file.
        ValueError: ``imagesTr`` holds no NIfTI file.
    """
    root = Path(root)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"MSD folder {root} has no imagesTr/ directory (expected imagesTr/*.nii.gz "
                                f"and labelsTr/*.nii.gz)")
    images = sorted(p for p in images_dir.iterdir()
                    if not p.name.startswith(".") and p.name.endswith(_SUFFIXES))
    if not images:
        raise ValueError(f"{images_dir} holds no .nii or .nii.gz file")
    return pair_with_labels(images, labels_dir)


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:  # nibabel raises many types for truncated / foreign files
        raise ValueError(f"cannot read NIfTI file {path}: {exc}") from exc
    return data, zooms


def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Per-channel robust z-score of ``image`` (M, *spatial) -> float32 of the same shape (see module doc)."""
    out = np.empty(image.shape, dtype=np.float32)
    for m, channel in enumerate(image.astype(np.float64)):
        lo, hi = np.percentile(channel, (0.5, 99.5))
        channel = np.clip(channel, lo, hi)
        std = channel.std()
        out[m] = (channel - channel.mean()) / std if std > 0 else 0.0
    return out


def load_msd_case(image_path: str | Path, label_path: str | Path, *, normalize: bool = True) -> MSDVolume:
    """Read one image / label pair.

    Raises:
        ValueError: a file is unreadable, the image is not 3D/4D, the label is not a 3D map of integers in
            [0, 255], or the image and label spatial shapes differ (all name the file(s)).
    """
    image_path, label_path = Path(image_path), Path(label_path)
    image, zooms = _read(image_path)
    label, _ = _read(label_path)
    if image.ndim == 3:
        image = image[None]
    elif image.ndim == 4:
        image = np.moveaxis(image, -1, 0)
    else:
        raise ValueError(f"image {image_path} must be 3D or 4D (modalities last), got shape {image.shape}")
    if label.ndim != 3 or label.shape != image.shape[1:]:
        raise ValueError(f"label {label_path} has shape {label.shape}, but image {image_path} has spatial shape "
                         f"{image.shape[1:]}")
    if not np.isfinite(image).all():
        raise ValueError(f"image {image_path} contains NaN or infinite values")
    if label.dtype.kind not in "iu":
        if not np.array_equal(label, np.round(label)):
            raise ValueError(f"label {label_path} holds non-integer values")
    if label.min() < 0 or label.max() > 255:
        raise ValueError(f"label {label_path} values must lie in [0, 255], got [{label.min()}, {label.max()}]")
    image = normalize_intensity(image) if normalize else image.astype(np.float32)
    return MSDVolume(image, label.astype(np.uint8), tuple(zooms[:3]), _case_name(image_path))


def slice_stack(image: np.ndarray, label: np.ndarray, *, axis: int = 2,
                slices: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Cut a volume into 2D samples of ``slices`` adjacent slices along spatial ``axis``.

    Args:
        image: (M, *spatial) with 3 spatial axes.
        label: (*spatial).
        axis: spatial axis (0, 1 or 2) to slice along.
        slices: positive odd number of adjacent slices per sample.

    Returns:
        images (S, M * slices, h, w) float32 and labels (S, h, w) of ``label``'s dtype, S = size along axis;
        (h, w) are the two other spatial axes in order.
    """
    if image.ndim != 4 or label.shape != image.shape[1:]:
        raise ValueError(f"image must be (M, X, Y, Z) and label (X, Y, Z) of the same spatial shape, got "
                         f"{image.shape} and {label.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (a spatial axis), got {axis!r}")
    if not isinstance(slices, int) or slices < 1 or slices % 2 == 0:
        raise ValueError(f"slices must be a positive odd int, got {slices!r}")
    img = np.moveaxis(image, axis + 1, 1)  # (M, S, h, w)
    lab = np.moveaxis(label, axis, 0)  # (S, h, w)
    n = lab.shape[0]
    neighbours = np.clip(np.arange(n)[:, None] + np.arange(slices)[None] - slices // 2, 0, n - 1)  # (S, slices)
    stacks = img[:, neighbours]  # (M, S, slices, h, w)
    stacks = np.moveaxis(stacks, 0, 1).reshape(n, -1, *lab.shape[1:])
    return np.ascontiguousarray(stacks, dtype=np.float32), np.ascontiguousarray(lab)


def _pad_center(array: np.ndarray, size: tuple[int, int], value: float) -> np.ndarray:
    """Pad (or crop) the last two axes of ``array`` symmetrically to ``size``."""
    out = np.full(array.shape[:-2] + tuple(size), value, dtype=array.dtype)
    src, dst = [], []
    for have, want in zip(array.shape[-2:], size):
        if have <= want:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
        else:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
    out[(..., *dst)] = array[(..., *src)]
    return out


class MSDSliceDataset(torch.utils.data.Dataset):
    """2D slice stacks of MSD cases, loaded into memory; items ``(image, label)``.

    Each image is (M * slices, h, w) float32 and each label (h, w) int64, padded (centred) to a common
    in-plane size: images with their volume's minimum, labels with 0. Cases smaller than ``size`` are
    padded, larger ones cropped at the centre.

    Args:
        cases: ``(image_path, label_path)`` pairs, e.g. from :func:`find_msd_cases`.
        slices: positive odd number of adjacent slices per sample.
        axis: spatial axis to slice along (2 = the NIfTI z axis).
        size: common (h, w); default: the largest in-plane shape, rounded up to a multiple of 16.

    Attributes:
        num_classes: 1 + the largest label value found.
        volumes: the loaded :class:`MSDVolume` objects.
        index: (volume number, slice number) of each item.
    """

    def __init__(self, cases: Sequence[tuple[str | Path, str | Path]], *, slices: int = 5, axis: int = 2,
                 size: tuple[int, int] | None = None) -> None:
        if len(cases) == 0:
            raise ValueError("cases must hold at least one (image_path, label_path) pair")
        self.volumes = [load_msd_case(image, label) for image, label in cases]
        stacks = [slice_stack(v.image, v.label, axis=axis, slices=slices) for v in self.volumes]
        if size is None:
            size = tuple(int(-(-max(s[1].shape[d] for s in stacks) // 16) * 16) for d in (1, 2))
        elif len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"size must be two positive ints or None, got {size!r}")
        self.size = tuple(size)
        self.images = np.concatenate([_pad_center(img, self.size, float(img.min())) for img, _ in stacks])
        self.labels = np.concatenate([_pad_center(lab, self.size, 0) for _, lab in stacks])
        self.index = [(v, s) for v, (_, lab) in enumerate(stacks) for s in range(lab.shape[0])]
        self.num_classes = int(max(v.label.max() for v in self.volumes)) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.images[i]), torch.from_numpy(self.labels[i].astype(np.int64))
