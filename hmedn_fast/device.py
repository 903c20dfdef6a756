"""Turning a user's device option into a ``torch.device`` (shared by the demo, training and inference)."""
from __future__ import annotations

import torch


def resolve_device(device: str | None) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else CPU; otherwise ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ValueError: an unknown device string, a non-CPU/CUDA device, or CUDA asked for but not available.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev
