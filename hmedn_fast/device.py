"""Turning a user's device option into a ``torch.device``, and the channels-last format of a spatial rank (shared by
the demo, training and inference)."""
from __future__ import annotations

import torch


def resolve_device(device: str | None) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else CPU; otherwise ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    A CUDA device always comes back with its index (``"cuda"``: the current device), as tensors report theirs
    and as ``torch.cuda`` calls such as ``set_per_process_memory_fraction`` need.

    Raises:
        ValueError: an unknown device string, a non-CPU/CUDA device, CUDA asked for but not available, or a CUDA
            index beyond the visible devices.
    """
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                             f"are visible")
    return dev


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """``torch.channels_last`` for 2D (N, C, H, W) tensors, ``torch.channels_last_3d`` for 3D (N, C, D, H, W)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """Channels-last when x is (and is not also NC*-contiguous), else contiguous."""
    if x.ndim in (4, 5) and not x.is_contiguous():
        fmt = channels_last_format(x.ndim - 2)
        if x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format
