"""hmedn_fast: fast HMEDN layers, models, targets and losses for low-contrast medical image segmentation."""
from __future__ import annotations

__version__ = "0.1.0"
