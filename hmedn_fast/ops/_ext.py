"""Loader of the compiled extension ``hmedn_fast._C``.

Importing this module never fails: when the extension is absent (pure-Python install, no compiler) or
was built without CUDA, :func:`extension` returns ``None`` and :func:`missing_reason` says why, so the
dispatchers fall back to the reference implementations. Only an explicit ``backend="cpu"`` or
``backend="cuda"`` turns the absence into an error (see :mod:`hmedn_fast.ops.dispatch`).
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str]:
    try:
        mod = importlib.import_module("hmedn_fast._C")
    except ImportError as exc:  # not built, or built against another torch
        return None, (
            f"the compiled extension hmedn_fast._C could not be imported ({exc}); "
            "build it with `pip install --no-build-isolation -e .` on a machine with a C++ compiler"
        )
    return mod, ""


def extension() -> ModuleType | None:
    """The compiled extension module, or None when it is not available."""
    return _load()[0]


def missing_reason() -> str:
    """Why the extension is unavailable ('' when it is available)."""
    return _load()[1]


def has_cuda() -> bool:
    """True when the extension was compiled with the CUDA kernels of ``kernels/``."""
    mod = extension()
    return bool(mod is not None and getattr(mod, "with_cuda", lambda: False)())
