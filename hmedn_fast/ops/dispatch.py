"""Backend selection shared by every fast op.

Each public op lists its backends in order of preference with a function telling whether the backend can
serve the given inputs (returns ``None`` when it can, or a reason string when it cannot). The first
available one is used unless the caller forces one with ``backend=...`` or the environment variable
``HMEDN_BACKEND`` (``HMEDN_BACKEND_<OP>`` for one op, e.g. ``HMEDN_BACKEND_LOSS=reference``) names one.
Forcing an unavailable backend raises a ``RuntimeError`` that names what is missing.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

BACKENDS = ("reference", "cpu", "cuda", "triton")

Availability = Callable[[], "str | None"]


def choose_backend(op: str, requested: str | None, candidates: Sequence[tuple[str, Availability]]) -> str:
    """Pick the backend for ``op``.

    Args:
        op: short op name used in messages and in ``HMEDN_BACKEND_<OP>``.
        requested: ``None`` (automatic) or one of the candidate names.
        candidates: ``(name, availability)`` pairs in order of preference; ``availability()`` returns
            ``None`` when the backend can run these inputs, else a reason.
    """
    names = [name for name, _ in candidates]
    if requested is None:
        requested = os.environ.get(f"HMEDN_BACKEND_{op.upper()}") or os.environ.get("HMEDN_BACKEND") or None
        forced_by = "environment"
    else:
        forced_by = "argument"
    if requested is not None:
        if not isinstance(requested, str) or requested not in names:
            raise ValueError(f"backend must be one of {names} or None for {op}, got {requested!r}")
        reason = dict(candidates)[requested]()
        if reason is not None:
            raise RuntimeError(f"backend {requested!r} requested ({forced_by}) for {op} is unavailable: {reason}")
        return requested
    for name, available in candidates:
        if available() is None:
            return name
    raise RuntimeError(f"no backend available for {op}")  # pragma: no cover - reference is always last


def automatic(op: str, requested: str | None) -> bool:
    """True when neither ``requested`` nor ``HMEDN_BACKEND_<OP>`` / ``HMEDN_BACKEND`` forces a backend of ``op``."""
    return requested is None and not (os.environ.get(f"HMEDN_BACKEND_{op.upper()}") or os.environ.get("HMEDN_BACKEND"))


def triton_unavailable(*tensors) -> str | None:
    """Reason Triton cannot run on these tensors, or None. CPU tensors need ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "inputs are on the CPU and TRITON_INTERPRET=1 is not set"
    return None
