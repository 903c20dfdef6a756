"""Data: synthetic low-contrast phantom and an MSD-layout (NIfTI) folder reader."""
from __future__ import annotations

from .phantom import PHANTOM_CLASSES, PhantomConfig, PhantomDataset, PhantomSet, make_phantom

__all__ = ["PHANTOM_CLASSES", "PhantomConfig", "PhantomDataset", "PhantomSet", "make_phantom"]
