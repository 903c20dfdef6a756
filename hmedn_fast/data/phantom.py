"""Synthetic low-contrast pelvic-CT-like phantom for segmentation (2D slabs and 3D volumes).

Every sample holds three adjacent soft-tissue structures modelled on pelvic CT: prostate (label 1),
bladder (label 2, anterior to the prostate) and rectum (label 3, posterior to it). Their shapes vary per
sample (random semi-axes, in-plane rotation, smooth radial deformation, random position of the slab), and
the bladder and rectum always overlap the prostate's ellipsoid, so they touch it. What makes it hard is what
makes pelvic CT hard:

* **Low contrast at touching boundaries.** Organ means differ from the prostate's by at most
  ``contrast * noise_hu`` (default 0.4 of the noise level), while organ-versus-fat contrast is large.
* **Partly vanishing boundaries.** A thin fat plane (partial-volume dark line) marks only a random
  ``visible_boundary`` fraction of each touching boundary; elsewhere nothing but shape separates them.
* **CT-like noise.** Gaussian noise correlated in-plane (Gaussian noise-power kernel), independent
  across slices, with standard deviation ``noise_hu``.
* **Artifacts** (``artifacts=True``): a rectal gas pocket (half of the samples) and background bowel gas
  with alternating bright/dark streaks radiating from the gas, and the dark beam-hardening band between
  the femoral heads, which crosses the organs.

Geometry is defined in millimetres (in-plane field of view ``fov_mm``), so the anatomy is the same at any
image size. Intensities are simulated in Hounsfield units and returned through the soft-tissue window
(level 40, width 400): ``image = (clip(HU, -160, 240) - 40) / 200``, so values lie in [-1, 1] and the
noise standard deviation is ``noise_hu / 200``.

A 2D sample is a thin 3D slab of ``slices`` (default 5) adjacent axial slices stacked as channels (the
paper's 2D input); its label is the middle slice. A 3D sample is a volume of isotropic voxels with one
channel. Sample ``i`` of seed ``s`` depends only on ``(s, i)`` and the config, so :func:`make_phantom`
and :class:`PhantomDataset` give identical samples.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage

PHANTOM_CLASSES = ("background", "prostate", "bladder", "rectum")
"""Label names, index = label value."""

_WINDOW_LEVEL, _WINDOW_HALF_WIDTH = 40.0, 200.0
_FAT_HU, _MUSCLE_HU, _BONE_HU, _GAS_HU = -90.0, 55.0, 600.0, -900.0


@dataclass(frozen=True)
class PhantomConfig:
    """Options of the phantom; validated on construction (ValueError/TypeError naming the option).

    Attributes:
        spatial_dims: 2 (slab of ``slices`` channels, label of the middle slice) or 3 (volume, 1 channel).
        size: spatial size, an int (square / cube) or a tuple of ``spatial_dims`` ints, each >= 16.
        slices: odd number of adjacent slices stacked as channels in 2D (ignored in 3D).
        fov_mm: in-plane field of view of the larger in-plane side, in mm (voxels are square in-plane,
            isotropic in 3D).
        slice_mm: distance between adjacent 2D slab slices in mm.
        noise_hu: standard deviation of the CT noise in HU (> 0).
        contrast: largest organ-to-prostate mean difference, as a fraction of ``noise_hu`` (>= 0).
        visible_boundary: fraction in [0, 1] of each touching boundary marked by a fat plane.
        artifacts: add gas pockets and streak / beam-hardening artifacts.
    """

    spatial_dims: int = 2
    size: int | tuple[int, ...] = 96
    slices: int = 5
    fov_mm: float = 128.0
    slice_mm: float = 3.0
    noise_hu: float = 20.0
    contrast: float = 0.4
    visible_boundary: float = 0.4
    artifacts: bool = True

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3) or isinstance(self.spatial_dims, bool):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        size = (self.size,) * self.spatial_dims if isinstance(self.size, (int, np.integer)) else self.size
        if (
            not isinstance(size, (tuple, list))
            or len(size) != self.spatial_dims
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 16 for s in size)
        ):
            raise ValueError(f"size must be an int or {self.spatial_dims} ints, each >= 16, got {self.size!r}")
        object.__setattr__(self, "size", tuple(int(s) for s in size))
        if not isinstance(self.slices, (int, np.integer)) or self.slices < 1 or self.slices % 2 == 0:
            raise ValueError(f"slices must be a positive odd int, got {self.slices!r}")
        for name in ("fov_mm", "slice_mm", "noise_hu"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.contrast, (int, float)) or not 0 <= self.contrast < 10:
            raise ValueError(f"contrast must be a number in [0, 10), got {self.contrast!r}")
        if not isinstance(self.visible_boundary, (int, float)) or not 0 <= self.visible_boundary <= 1:
            raise ValueError(f"visible_boundary must be in [0, 1], got {self.visible_boundary!r}")
        if not isinstance(self.artifacts, bool):
            raise TypeError(f"artifacts must be a bool, got {type(self.artifacts).__name__}")

    @property
    def in_channels(self) -> int:
        """Channels of an image: ``slices`` in 2D, 1 in 3D."""
        return self.slices if self.spatial_dims == 2 else 1

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm per spatial axis (2D: (row, col); 3D: (z, row, col))."""
        step = self.fov_mm / max(self.size[-2:])
        return (step,) * self.spatial_dims


class PhantomSet(NamedTuple):
    """Arrays returned by :func:`make_phantom`.

    Attributes:
        images: (N, C, *spatial) float32, windowed intensities in [-1, 1]; C = ``slices`` in 2D, 1 in 3D.
        labels: (N, *spatial) uint8, 0 background, 1 prostate, 2 bladder, 3 rectum.
        spacing: voxel size in mm per spatial axis.
    """

    images: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, ...]


def _resolve(config: PhantomConfig | None, options: dict[str, Any]) -> PhantomConfig:
    if config is not None and not isinstance(config, PhantomConfig):
        raise TypeError(f"config must be a PhantomConfig or None, got {type(config).__name__}")
    return dataclasses.replace(config or PhantomConfig(), **options)


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _grid(cfg: PhantomConfig, z_center: float) -> np.ndarray:
    """(3, Z, H, W) coordinates in mm (z, y, x); y grows posteriorly (down the image)."""
    step = cfg.spacing[-1]
    h, w = cfg.size[-2:]
    if cfg.spatial_dims == 2:
        z = z_center + (np.arange(cfg.slices) - cfg.slices // 2) * cfg.slice_mm
    else:
        z = z_center + (np.arange(cfg.size[0]) - (cfg.size[0] - 1) / 2) * step
    y = (np.arange(h) - (h - 1) / 2) * step
    x = (np.arange(w) - (w - 1) / 2) * step
    return np.stack(np.meshgrid(z, y, x, indexing="ij"))


def _voxel_mm(cfg: PhantomConfig) -> tuple[float, float, float]:
    """Voxel size in mm of the simulated (Z, H, W) grid (2D: slab slices are ``slice_mm`` apart)."""
    step = cfg.spacing[-1]
    return (cfg.slice_mm if cfg.spatial_dims == 2 else step, step, step)


def _level(grid: np.ndarray, center: np.ndarray, radii: np.ndarray, angle: float,
           rng: np.random.Generator, wobble: float) -> np.ndarray:
    """Normalised ellipsoid level (< 0 inside) with a smooth random radial deformation of size <= wobble."""
    d = grid - center[:, None, None, None]
    c, s = np.cos(angle), np.sin(angle)
    local = np.stack([d[0], c * d[1] + s * d[2], -s * d[1] + c * d[2]]) / radii[:, None, None, None]
    r = np.sqrt((local**2).sum(0))
    u = local / (r + 1e-9)
    bump = np.zeros_like(r)
    amplitudes = rng.dirichlet(np.ones(3)) * wobble
    for a in amplitudes:
        k = rng.normal(0.0, 0.8, size=3)
        bump += a * np.cos(np.pi * np.tensordot(k, u, axes=1) + rng.uniform(0, 2 * np.pi))
    return r - 1.0 - bump


def _touching(labels: np.ndarray, a: int, b: int) -> np.ndarray:
    """Voxels of class a or b with a face neighbour (in-plane or across slices) of the other class."""
    out = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        for shift in (1, -1):
            nb = np.roll(labels, shift, axis=axis)
            edge = [slice(None)] * labels.ndim
            edge[axis] = 0 if shift == 1 else -1
            nb[tuple(edge)] = 0  # no wrap-around
            out |= ((labels == a) & (nb == b)) | ((labels == b) & (nb == a))
    return out


def _smooth_field(grid: np.ndarray, rng: np.random.Generator, scale_mm: float) -> np.ndarray:
    """Smooth random field with values roughly uniform in [0, 1) (sum of random plane waves, ranked)."""
    field = np.zeros(grid.shape[1:])
    for _ in range(4):
        k = rng.normal(0.0, 1.0, size=3) / scale_mm
        field += np.cos(2 * np.pi * np.tensordot(k, grid, axes=1) + rng.uniform(0, 2 * np.pi))
    return field


def _streaks(grid: np.ndarray, center: np.ndarray, rng: np.random.Generator, amplitude: float,
             z_radius: float) -> np.ndarray:
    """Alternating bright/dark streaks radiating from an in-plane point, fading with distance and z."""
    dy, dx = grid[1] - center[1], grid[2] - center[2]
    dist = np.hypot(dy, dx)
    out = np.zeros(dist.shape)
    for i, theta in enumerate(rng.uniform(0, np.pi, size=rng.integers(4, 9))):
        across = -np.sin(theta) * dy + np.cos(theta) * dx
        sign = 1.0 if i % 2 == 0 else -1.0
        out += sign * rng.uniform(0.5, 1.0) * np.exp(-0.5 * (across / 1.5) ** 2)
    fade = np.exp(-dist / 45.0) * np.exp(-0.5 * ((grid[0] - center[0]) / z_radius) ** 2)
    return amplitude * out * fade


def _sample(cfg: PhantomConfig, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample: image (C, *spatial) float32 and label (*spatial) uint8."""
    rng = np.random.default_rng([seed, index, cfg.spatial_dims])
    sigma = cfg.noise_hu
    # --- organs: prostate, then bladder (anterior, -y) and rectum (posterior, +y) overlapping it.
    p_center = np.array([0.0, rng.uniform(-6, 6), rng.uniform(-6, 6)])
    p_radii = np.array([rng.uniform(16, 22), rng.uniform(12, 17), rng.uniform(15, 21)])
    b_radii = np.array([rng.uniform(25, 35), rng.uniform(15, 24), rng.uniform(20, 30)])
    r_radii = np.array([rng.uniform(30, 40), rng.uniform(9, 13), rng.uniform(11, 16)])
    centers = [p_center]
    for radii, direction in ((b_radii, -np.pi / 2), (r_radii, np.pi / 2)):
        phi = direction + rng.uniform(-0.35, 0.35)
        unit = np.array([0.0, np.sin(phi), np.cos(phi)])
        reach = lambda rad: 1.0 / np.sqrt((unit[1] / rad[1]) ** 2 + (unit[2] / rad[2]) ** 2)  # noqa: E731
        gap = 0.78 * (reach(p_radii) + reach(radii))
        centers.append(p_center + gap * unit + np.array([rng.uniform(-3, 3), 0.0, 0.0]))
    z_center = rng.uniform(-0.3, 0.3) * p_radii[0] if cfg.spatial_dims == 2 else rng.uniform(-3, 3)
    grid = _grid(cfg, z_center)
    levels = np.stack([
        _level(grid, c, rad, rng.uniform(-0.3, 0.3), rng, wobble=0.12)
        for c, rad in zip(centers, (p_radii, b_radii, r_radii))
    ])
    labels = np.where(levels.min(0) < 0, levels.argmin(0) + 1, 0).astype(np.uint8)

    # --- intensities (HU): fat background, muscles, bones, organs within contrast * sigma of the prostate.
    hu = np.full(grid.shape[1:], _FAT_HU)
    bone_y = p_center[1] + rng.uniform(-4, 8)
    bone_x = rng.uniform(56, 64)
    for side in (-1.0, 1.0):
        muscle = np.array([0.0, bone_y, side * (bone_x - rng.uniform(20, 24))])
        hu[_level(grid, muscle, np.array([80.0, 26.0, 6.5]), rng.uniform(-0.2, 0.2), rng, 0.05) < 0] = _MUSCLE_HU
        head = np.array([0.0, bone_y, side * bone_x])
        hu[_level(grid, head, np.array([80.0, 19.0, 19.0]), 0.0, rng, 0.03) < 0] = _BONE_HU
    pubis = np.array([0.0, centers[1][1] - b_radii[1] - rng.uniform(6, 12), rng.uniform(-4, 4)])
    hu[_level(grid, pubis, np.array([80.0, 6.0, 14.0]), 0.0, rng, 0.05) < 0] = _BONE_HU
    prostate_hu = rng.uniform(35, 45)
    organ_hu = [prostate_hu] + [
        prostate_hu + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.0) * cfg.contrast * sigma for _ in range(2)
    ]
    for k in range(3):
        hu[labels == k + 1] = organ_hu[k]
    # Fat planes on a random part of each touching boundary (the rest of the boundary vanishes).
    visible = _smooth_field(grid, rng, scale_mm=25.0)
    for a, b in ((1, 2), (1, 3), (2, 3)):
        touch = _touching(labels, a, b)
        if touch.any() and cfg.visible_boundary > 0:
            cut = np.quantile(visible[touch], 1.0 - cfg.visible_boundary)
            hu[touch & (visible >= cut)] += rng.uniform(-70, -40)

    streaks = np.zeros_like(hu)
    if cfg.artifacts:
        gas_centers = []
        if rng.random() < 0.5:  # rectal gas pocket inside the wall, labelled rectum
            gas_c = centers[2] + np.array([rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-3, 3)])
            gas_r = r_radii * np.array([0.6, rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)])
            lumen = ndimage.distance_transform_edt(labels == 3, sampling=_voxel_mm(cfg)) > 5.0  # 5 mm wall
            hu[(_level(grid, gas_c, gas_r, 0.0, rng, 0.1) < 0) & lumen] = _GAS_HU
            gas_centers.append((gas_c, gas_r[0]))
        for _ in range(rng.integers(0, 3)):  # bowel gas outside the organs
            c = np.array([rng.uniform(-5, 5), rng.uniform(-60, 60), rng.uniform(-60, 60)])
            rad = rng.uniform(3, 7)
            hu[(_level(grid, c, np.array([rad, rad, rad]), 0.0, rng, 0.1) < 0) & (hu == _FAT_HU)] = _GAS_HU
            gas_centers.append((c, rad))
        for c, z_rad in gas_centers:
            streaks += _streaks(grid, c, rng, rng.uniform(2.0, 4.0) * sigma, z_rad)
        # Beam hardening: dark band joining the femoral heads.
        band = np.exp(-0.5 * ((grid[1] - bone_y) / rng.uniform(3, 5)) ** 2) * (np.abs(grid[2]) < bone_x)
        streaks -= rng.uniform(1.5, 3.0) * sigma * band

    # --- scanner blur, correlated noise (in-plane), artifacts, window.
    step = cfg.spacing[-1]
    in_plane = (0.0, 0.8 / step, 0.8 / step)
    hu = ndimage.gaussian_filter(hu, in_plane)
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape), in_plane)
    noise *= sigma / noise.std()
    hu = hu + noise + streaks
    image = (np.clip(hu, _WINDOW_LEVEL - _WINDOW_HALF_WIDTH, _WINDOW_LEVEL + _WINDOW_HALF_WIDTH)
             - _WINDOW_LEVEL) / _WINDOW_HALF_WIDTH
    if cfg.spatial_dims == 2:
        return image.astype(np.float32), labels[cfg.slices // 2]
    return image[None].astype(np.float32), labels


def make_phantom(num_samples: int, *, seed: int = 0, config: PhantomConfig | None = None,
                 **options: Any) -> PhantomSet:
    """Generate ``num_samples`` phantom samples as numpy arrays.

    Args:
        num_samples: number of samples (>= 1).
        seed: non-negative int; the same seed and options give the same arrays.
        config: base options (default ``PhantomConfig()``); ``options`` override its fields, e.g.
            ``make_phantom(8, spatial_dims=3, size=48)``.

    Returns:
        :class:`PhantomSet` with images (N, C, *spatial) float32, labels (N, *spatial) uint8 and spacing.
    """
    if not isinstance(num_samples, (int, np.integer)) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    _check_seed(seed)
    cfg = _resolve(config, options)
    pairs = [_sample(cfg, int(seed), i) for i in range(int(num_samples))]
    return PhantomSet(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), cfg.spacing)


class PhantomDataset(torch.utils.data.Dataset):
    """Map-style torch Dataset of phantom samples, generated on access (sample i equals make_phantom's i).

    Each item is ``(image, label)``: image (C, *spatial) float32 tensor, label (*spatial) int64 tensor.

    Args:
        length: number of samples (>= 1).
        seed: non-negative int.
        config: base options (default ``PhantomConfig()``); ``options`` override its fields.
    """

    def __init__(self, length: int, *, seed: int = 0, config: PhantomConfig | None = None, **options: Any):
        if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        _check_seed(seed)
        self.length = int(length)
        self.seed = int(seed)
        self.config = _resolve(config, options)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for PhantomDataset of length {self.length}")
        image, label = _sample(self.config, self.seed, index % self.length)
        return torch.from_numpy(image), torch.from_numpy(label.astype(np.int64))
