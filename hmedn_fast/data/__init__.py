"""Data: synthetic low-contrast phantom and an MSD-layout (NIfTI) folder reader."""
from __future__ import annotations

from .msd import MSDSliceDataset, MSDVolume, find_msd_cases, load_msd_case, normalize_intensity, slice_stack
from .phantom import PHANTOM_CLASSES, PhantomConfig, PhantomDataset, PhantomSet, make_phantom

__all__ = ["PHANTOM_CLASSES", "PhantomConfig", "PhantomDataset", "PhantomSet", "make_phantom", "MSDSliceDataset",
           "MSDVolume", "find_msd_cases", "load_msd_case", "normalize_intensity", "slice_stack"]
