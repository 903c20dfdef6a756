"""Pairing image files with their label files in the folder layouts we read (MSD, PNG instance folders)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


def pair_with_labels(images: Iterable[Path], labels_dir: Path) -> list[tuple[Path, Path]]:
    """``(image, labels_dir / image.name)`` for every image; FileNotFoundError naming a missing label file."""
    pairs = []
    for image in images:
        label = labels_dir / image.name
        if not label.is_file():
            raise FileNotFoundError(f"label file {label} for image {image} is missing")
        pairs.append((image, label))
    return pairs
