"""Anatomically-constrained merging of predicted label maps (paper IV-A6, SPEC section 5).

Rules, applied to each label map independently (``connectivity`` defines both foreground components and
the connectivity of enclosed regions; 1 = face neighbours):

1. The connected components of every foreground class (``1 ..``) are found with ``scipy.ndimage.label``.
   The *large structures* are, with ``large_size=None``, the largest component of each class present
   (one per class: organs are single objects; ties go to the first component in scan order), or with an
   int, every component of at least ``large_size`` voxels.
2. **Absorb:** a region enclosed by a large structure ``L`` of class ``k`` (a connected component of the
   complement of ``L`` that does not touch the image border, whatever labels it holds) becomes class ``k``,
   unless it contains a voxel of another large structure (so a large structure nested in another one,
   e.g. a tumour core inside the whole tumour, is kept).
3. **Drop:** the remaining components that are not large and have fewer than ``min_size`` voxels become
   background (0). Components of at least ``min_size`` voxels are kept as they are.

Sizes are counted in voxels, so ``min_size`` and ``large_size`` depend on the image resolution.
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi


def _merge_one(lab: np.ndarray, min_size: int, large_size: int | None, structure: np.ndarray) -> np.ndarray:
    out = lab.copy()
    large_any = np.zeros(lab.shape, dtype=bool)
    drop = np.zeros(lab.shape, dtype=bool)
    large = []  # (class, bounding box, mask of the structure in the box)
    for k in np.unique(lab):
        if k == 0:
            continue
        comp, _ = ndi.label(lab == k, structure)
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        if large_size is None:
            is_large = np.zeros(len(sizes), dtype=bool)
            is_large[int(sizes.argmax())] = True
        else:
            is_large = sizes >= large_size
        is_large[0] = False
        large_any |= is_large[comp]
        drop |= (comp > 0) & ~is_large[comp] & (sizes[comp] < min_size)
        for idx, box in enumerate(ndi.find_objects(comp), start=1):
            if is_large[idx]:
                large.append((k, box, comp[box] == idx))
    absorbed = np.zeros(lab.shape, dtype=bool)
    for k, box, mask in large:
        # inside the bounding box, the enclosed regions are the complement's components off the box border
        holes = ndi.binary_fill_holes(mask, structure) & ~mask
        if not holes.any():
            continue
        regions, _ = ndi.label(holes, structure)
        blocked = np.unique(regions[large_any[box]])
        take = (regions > 0) & ~np.isin(regions, blocked[blocked > 0])
        out[box][take] = k
        absorbed[box] |= take
    out[drop & ~absorbed] = 0
    return out


def anatomical_merge(
    labels,
    min_size: int = 64,
    large_size: int | None = None,
    spatial_dims: int | None = None,
    connectivity: int = 1,
):
    """Absorb regions enclosed by large structures and drop tiny isolated components (rules above).

    Args:
        labels: integer label map (0 = background), numpy array or torch tensor (any device), shaped
            ``(*spatial)`` or ``(N, *spatial)`` with 2 or 3 spatial dims.
        min_size: components (not large) with fewer voxels than this are set to background; 0 drops none.
        large_size: ``None`` (the largest component of each class is its large structure) or a voxel count
            from which every component is large.
        spatial_dims: 2 or 3. ``None`` means every dim of ``labels`` is spatial (no batch dim); with a value,
            ``labels.ndim == spatial_dims + 1`` means the first dim is a batch processed map by map.
        connectivity: 1 (face neighbours) up to the number of spatial dims (all neighbours), as
            ``scipy.ndimage.generate_binary_structure``.
    Returns:
        merged label map of the input's type, shape, dtype and device.
    """
    is_tensor = type(labels).__module__.startswith("torch") and hasattr(labels, "detach")
    if is_tensor:
        arr = labels.detach().cpu().numpy()
    elif isinstance(labels, np.ndarray):
        arr = labels
    else:
        raise TypeError(f"labels must be a numpy array or a torch tensor, got {type(labels).__name__}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must have an integer dtype, got {arr.dtype}")
    if spatial_dims not in (None, 2, 3):
        raise ValueError(f"spatial_dims must be None, 2 or 3, got {spatial_dims!r}")
    nd = arr.ndim if spatial_dims is None else spatial_dims
    if nd not in (2, 3) or arr.ndim not in (nd, nd + 1):
        raise ValueError(
            f"labels must be (*spatial) or (N, *spatial) with 2 or 3 spatial dims (spatial_dims={spatial_dims}), "
            f"got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"labels must be non-empty, got shape {arr.shape}")
    if arr.min() < 0:
        raise ValueError(f"labels must not contain negative values, got minimum {arr.min()}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
    if large_size is not None and (
        isinstance(large_size, bool) or not isinstance(large_size, (int, np.integer)) or large_size < 1
    ):
        raise ValueError(f"large_size must be None or an int >= 1, got {large_size!r}")
    if isinstance(connectivity, bool) or connectivity not in range(1, nd + 1):
        raise ValueError(f"connectivity must be an int in [1, {nd}], got {connectivity!r}")
    structure = ndi.generate_binary_structure(nd, connectivity)
    batch = arr if arr.ndim == nd + 1 else arr[None]
    merged = np.stack([_merge_one(lab, int(min_size), large_size, structure) for lab in batch])
    merged = merged if arr.ndim == nd + 1 else merged[0]
    if is_tensor:
        import torch

        return torch.from_numpy(merged).to(device=labels.device)
    return merged


__all__ = ["anatomical_merge"]
