"""What every benchmark record states about where and from what it ran (benchmarks/ is on sys.path for the GPU
scripts and for pytest).

``environment()`` gives the card, the UTC date, the git commit and the versions of Python, PyTorch, CUDA, cuDNN
and Triton; ``card_slug()`` the card's name as record file names spell it. A copy of the working tree without
``.git`` (the GPU machines' copy) has no commit to read: pass it as ``HMEDN_GIT_COMMIT`` in the environment.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """``HMEDN_GIT_COMMIT`` if set, else the checkout's HEAD (with ``-dirty`` when tracked files differ from it),
    else None."""
    if os.environ.get("HMEDN_GIT_COMMIT"):
        return os.environ["HMEDN_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: str = "cuda") -> dict:
    """``card`` (the current CUDA device's name, or the CPU's on ``device="cpu"``), ``date`` (UTC, ISO 8601),
    ``git_commit``, ``python``, ``torch``, ``cuda``, ``cudnn`` (None on the CPU) and ``triton`` (None when not
    installed)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = device != "cpu"
    return {"card": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine() or "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if on_gpu else None,
            "triton": triton_version}


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3' (the results/ file-name convention)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
