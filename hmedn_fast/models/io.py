"""Saving and loading models built by :func:`create_model` (weights + the name and overrides to rebuild them)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .registry import create_model

FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the target folder, then rename it over ``path``: a crash never
    leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def model_record(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """The dictionary :func:`save_model` writes: format version, model name, overrides, state dict, extras."""
    config = getattr(model, "hmedn_config", None)
    if config is None:
        raise ValueError("model has no hmedn_config: build it with hmedn_fast.models.create_model(...)")
    return {"format": FORMAT_VERSION, "model": config["name"], "overrides": config["overrides"],
            "state_dict": model.state_dict(), **extra}


def save_model(model: nn.Module, path: str | os.PathLike, **extra: Any) -> Path:
    """Write the model (and any ``extra`` metadata, e.g. ``spacing`` or ``intensity``) atomically to ``path``."""
    return atomic_save(model_record(model, **extra), path)


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model` (or a trainer checkpoint holding the same keys).

    Returns ``(model, record)``; the model is in eval mode. Raises ValueError naming the file when it is
    not such a checkpoint.
    """
    path = Path(path)
    try:
        record = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # unreadable, truncated, not a torch file
        raise ValueError(f"cannot read model checkpoint {path}: {exc}") from exc
    if not isinstance(record, dict) or "model" not in record or "state_dict" not in record:
        raise ValueError(f"{path} is not an hmedn_fast model checkpoint (needs 'model' and 'state_dict' keys)")
    model = create_model(record["model"], **record.get("overrides", {}))
    model.load_state_dict(record["state_dict"])
    return model.eval(), record
