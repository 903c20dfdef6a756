"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is the :func:`hmedn_fast.models.io.model_record` of the model (so ``load_model`` and
``hmedn infer`` read it) plus:

- ``optimizer``, ``scheduler``, ``scaler``: their ``state_dict()``;
- ``rng``: the Python, numpy and torch (CPU and every CUDA device) generator states;
- ``position``: ``{"epoch", "step"}`` = the next step to run (step 0 of an epoch after an epoch end), and
  the running sums of the epoch's losses so far, so the epoch's logged mean is the uninterrupted one;
- ``history`` (per-epoch log rows), ``best`` (best validation score and its epoch), ``nonfinite``
  (steps skipped so far), ``config`` (the :class:`~hmedn_fast.train.config.TrainConfig` as a dict),
  ``split`` (train / validation case names), ``memory_plan`` and ``spacing`` / ``slices`` / ``spatial_dims``
  of the data.

Files are written to a temporary file in the run folder and renamed over the target
(:func:`hmedn_fast.models.io.atomic_save`), so a kill at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hmedn_fast.models.io import atomic_save, model_record

REQUIRED_KEYS = ("format", "model", "overrides", "state_dict", "optimizer", "scheduler", "scaler", "rng", "position")


def capture_rng_state() -> dict[str, Any]:
    """States of Python's, numpy's and torch's (CPU and all CUDA devices) global generators."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA states only when CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any, position: dict[str, Any], **extra: Any) -> Path:
    """Write a training checkpoint atomically (see the module doc); ``model`` may be DDP-wrapped."""
    model = getattr(model, "module", model)
    record = model_record(model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                          scaler=scaler.state_dict(), rng=capture_rng_state(), position=dict(position), **extra)
    return atomic_save(record, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint to the CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable, or not a training checkpoint (names the file and the missing keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        record = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    missing = [k for k in REQUIRED_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"{path} is not an hmedn_fast training checkpoint: missing {missing}")
    return record
