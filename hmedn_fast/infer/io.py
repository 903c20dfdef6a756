"""Reading images for inference, normalising them, and writing label maps next to them.

* NIfTI (``.nii``, ``.nii.gz``): 2D, 3D or 4D with the modalities on the last axis (MSD convention), returned
  channels-first (C, *spatial) float32. The image object is kept so that label maps are written with the
  input's affine and header (data type set to uint8/uint16, scaling reset, one volume).
* PNG (2D): grayscale -> 1 channel, RGB -> 3; an alpha channel is dropped (RGBA -> RGB, LA -> L), since
  microscopy PNGs (e.g. DSB 2018) carry an opaque one. Label maps are written as 8- or 16-bit grayscale PNGs.

Intensity normalisation (:func:`normalize`) follows the checkpoint's ``record["intensity"]``:

* absent / None / ``"zscore"``: per channel, subtract the volume's mean and divide by its standard deviation
  (a constant channel becomes 0);
* ``"clip_zscore"``: clip each channel to its 0.5 / 99.5 percentiles first (what
  :func:`hmedn_fast.data.normalize_intensity`, the MSD reader used in training, does);
* ``"none"``: the stored values as float32;
* ``{"mean": [...], "std": [...]}``: fixed per-channel statistics (one value per channel, or one for all).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PNG_SUFFIXES = (".png",)
SUFFIXES = NIFTI_SUFFIXES + PNG_SUFFIXES


@dataclass
class LoadedImage:
    """An image read by :func:`read_image`.

    Attributes:
        data: (C, *spatial) float32, as stored (not normalised).
        path: the file read.
        kind: "nifti" or "png".
        nifti: the nibabel image (affine and header for writing), or None for PNG.
    """

    data: np.ndarray
    path: Path
    kind: str
    nifti: Any = None


def stem(path: str | os.PathLike) -> str:
    """File name without its image suffix (``case.nii.gz`` -> ``case``)."""
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(PNG_SUFFIXES):
        return "png"
    raise ValueError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read a NIfTI or PNG image (module doc) -> :class:`LoadedImage`.

    Raises:
        ValueError: unsupported suffix, unreadable / corrupt file, non-finite values, or a NIfTI image that is
            not 2D, 3D or 4D (each message names the file).
    """
    path = Path(path)
    kind = _kind(path)
    try:
        if kind == "nifti":
            import nibabel as nib

            img = nib.load(str(path))
            data = np.asarray(img.dataobj, dtype=np.float32)
        else:
            from PIL import Image

            with Image.open(path) as pil:
                mode = {"RGBA": "RGB", "LA": "L", "P": "RGB", "PA": "RGB"}.get(pil.mode, pil.mode)
                data = np.asarray(pil.convert(mode) if mode != pil.mode else pil, dtype=np.float32)
            img = None
    except Exception as exc:  # nibabel / PIL raise many types for truncated or foreign files
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    if kind == "nifti":
        if data.ndim not in (2, 3, 4):
            raise ValueError(f"NIfTI image {path} must be 2D, 3D or 4D (modalities last), got shape {data.shape}")
        data = np.moveaxis(data, -1, 0) if data.ndim == 4 else data[None]
    else:
        data = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
    if not np.isfinite(data).all():
        raise ValueError(f"image {path} contains NaN or infinite values")
    return LoadedImage(np.ascontiguousarray(data), path, kind, img)


def normalize(data: np.ndarray, intensity: Any = None) -> np.ndarray:
    """Normalise (C, *spatial) ``data`` per channel as ``intensity`` says (module doc) -> float32 array.

    Raises:
        ValueError: unknown ``intensity`` mode, or ``mean`` / ``std`` lists of the wrong length or a std <= 0.
    """
    data = np.asarray(data, dtype=np.float64)
    if intensity in (None, "zscore", "clip_zscore"):
        out = np.empty(data.shape, dtype=np.float32)
        for c, channel in enumerate(data):
            if intensity == "clip_zscore":
                channel = np.clip(channel, *np.percentile(channel, (0.5, 99.5)))
            std = channel.std()
            out[c] = (channel - channel.mean()) / std if std > 0 else 0.0
        return out
    if intensity == "none":
        return data.astype(np.float32)
    if isinstance(intensity, dict) and {"mean", "std"} <= set(intensity):
        mean = np.asarray(intensity["mean"], np.float64).reshape(-1)
        std = np.asarray(intensity["std"], np.float64).reshape(-1)
        if mean.size not in (1, data.shape[0]) or std.size not in (1, data.shape[0]):
            raise ValueError(f"intensity mean/std need 1 or {data.shape[0]} values (one per channel), got "
                             f"{intensity['mean']!r} / {intensity['std']!r}")
        if (std <= 0).any():
            raise ValueError(f"intensity std values must be > 0, got {intensity['std']!r}")
        shape = (-1,) + (1,) * (data.ndim - 1)
        return ((data - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)
    raise ValueError(f"intensity must be None, 'zscore', 'clip_zscore', 'none' or {{'mean': [...], 'std': [...]}}, "
                     f"got {intensity!r}")


def write_labels(labels: np.ndarray, like: LoadedImage, out_dir: str | os.PathLike) -> Path:
    """Write ``labels`` (*spatial integer map of ``like``'s spatial shape) into ``out_dir`` under ``like``'s
    file name: NIfTI with ``like``'s affine and header, or PNG. Returns the path written.

    Raises:
        ValueError: shape mismatch, negative labels, or labels above 65535.
    """
    labels = np.asarray(labels)
    if labels.shape != like.data.shape[1:]:
        raise ValueError(f"labels have shape {labels.shape}, the image {like.path} has spatial shape "
                         f"{like.data.shape[1:]}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError(f"labels must lie in [0, 65535], got [{labels.min()}, {labels.max()}]")
    dtype = np.uint8 if labels.size == 0 or labels.max() <= 255 else np.uint16
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if like.kind == "png":
        from PIL import Image

        path = out_dir / f"{stem(like.path)}.png"
        Image.fromarray(labels.astype(dtype)).save(path)
        return path
    import nibabel as nib

    src = like.nifti
    header = src.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    out = type(src)(labels.astype(dtype), src.affine, header)
    out.set_qform(*src.get_qform(coded=True))
    out.set_sform(*src.get_sform(coded=True))
    name = like.path.name if like.path.name.lower().endswith(NIFTI_SUFFIXES) else f"{stem(like.path)}.nii.gz"
    path = out_dir / name
    nib.save(out, str(path))
    return path
