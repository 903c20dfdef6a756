"""Public difficulty-guided loss of HMEDN (SPEC section 3): input checks and backend dispatch.

Backends, in order of preference: ``"triton"`` (fused kernels of :mod:`hmedn_fast.ops.triton.loss`, CUDA
or ``TRITON_INTERPRET=1``), then ``"reference"`` (:mod:`hmedn_fast.ops.reference.loss`, any device and
dtype). ``backend=`` or ``HMEDN_BACKEND_LOSS`` / ``HMEDN_BACKEND`` force one.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from hmedn_fast.ops._ext import extension
from hmedn_fast.ops.dispatch import automatic, choose_backend, triton_unavailable
from hmedn_fast.ops.reference import loss as reference

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # logits and per-voxel maps
LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------------------------- checks
def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...], device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have a dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}; put every input on one device")
    return t


def _check_map(name: str, t: Tensor | None, n: int, size: tuple[int, ...], dtypes, device) -> None:
    """A per-voxel map must be (N, *size) or (N, 1, *size)."""
    if t is None:
        return
    _check_tensor(name, t, dtypes, device)
    if tuple(t.shape) not in ((n, *size), (n, 1, *size)):
        raise ValueError(f"{name} must have shape {(n, *size)} or {(n, 1, *size)}, got {tuple(t.shape)}")


def check_inputs(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    contour_logits: Tensor | None,
    contour_target: Tensor | None,
    alpha: float,
    class_weight: Tensor | None,
    ignore_index: int | None,
    reduction: str,
    return_parts: bool,
) -> None:
    """Shape, dtype, device and option checks (no data is read). Raises TypeError / ValueError."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    device = logits.device
    _check_tensor("logits", logits, FLOAT_DTYPES, device)
    if logits.ndim not in (4, 5):
        raise ValueError(f"logits must be (N, K, H, W) or (N, K, D, H, W), got shape {tuple(logits.shape)}")
    n, k, *low = logits.shape
    if n == 0 or any(s == 0 for s in low):
        raise ValueError(f"logits must be non-empty (N >= 1, every spatial size >= 1), got {tuple(logits.shape)}")
    if k < 2:
        raise ValueError(f"logits must have K >= 2 classes (background included), got K={k}")
    _check_tensor("labels", labels, LABEL_DTYPES, device)
    full = tuple(labels.shape[1:])
    if (
        labels.ndim != logits.ndim - 1
        or labels.shape[0] != n
        or any(f < s or f % s for f, s in zip(full, low))
    ):
        raise ValueError(
            f"labels must be (N, *spatial) with N={n} and each spatial size a multiple of the logits' "
            f"{tuple(low)} (logits {tuple(logits.shape)}), got labels {tuple(labels.shape)}"
        )
    _check_map("weight", weight, n, full, FLOAT_DTYPES, device)
    if (contour_logits is None) != (contour_target is None):
        raise ValueError("contour_logits and contour_target must be given together (or both None)")
    _check_map("contour_logits", contour_logits, n, tuple(low), FLOAT_DTYPES, device)
    _check_map("contour_target", contour_target, n, full, FLOAT_DTYPES, device)
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if class_weight is not None:
        _check_tensor("class_weight", class_weight, FLOAT_DTYPES, device)
        if tuple(class_weight.shape) != (k,):
            raise ValueError(f"class_weight must have shape ({k},) (one weight per class of logits), "
                             f"got {tuple(class_weight.shape)}")
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if return_parts and reduction == "none":
        raise ValueError("return_parts needs reduction 'mean' or 'sum', got reduction='none'")


def raise_label_error(labels: Tensor, num_classes: int, ignore_index: int | None) -> None:
    """Raise the ValueError for labels outside ``[0, num_classes)`` (ignore_index excepted), if any."""
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bool(bad.any()):
        values = labels[bad]
        extra = f" or equal ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"labels must lie in [0, {num_classes}){extra}; found {values.numel()} voxel(s) with values in "
            f"[{int(values.min())}, {int(values.max())}]"
        )


def nan_flag(t: Tensor | None, device: torch.device) -> Tensor:
    """0-dim bool on ``device``, True when ``t`` may hold a NaN: one reduction, no full-size temporary.

    ``isnan(sum(t))`` is True for every NaN, and also when +inf and -inf both occur (confirmed by
    :func:`raise_for_flags` on that rare path).
    """
    if t is None:
        return torch.zeros((), dtype=torch.bool, device=device)
    return torch.isnan(t.detach().sum(dtype=reference.compute_dtype(t)))


def raise_for_flags(
    flags: list[bool], logits: Tensor, labels: Tensor, contour_logits: Tensor | None, ignore_index: int | None
) -> None:
    """Confirm the suspicions ``flags = [bad labels, NaN logits, NaN contour_logits]`` and raise ValueError."""
    if flags[0]:
        raise_label_error(labels, logits.shape[1], ignore_index)
    for flag, name, t in ((flags[1], "logits", logits), (flags[2], "contour_logits", contour_logits)):
        if flag and bool(torch.isnan(t).any()):
            raise ValueError(f"{name} contain NaN")


def check_input_values(logits: Tensor, labels: Tensor, contour_logits: Tensor | None, ignore_index: int | None,
                       more_logits: Sequence[Tensor] = ()) -> None:
    """Label range and NaN checks with PyTorch ops; one host synchronisation when all is well. ``more_logits``:
    further logits scored against the same labels (deep-supervision heads), NaN-checked in the same read-back."""
    low, high = torch.aminmax(labels)
    device = logits.device
    flags = torch.stack(
        [(low < 0) | (high >= logits.shape[1]), nan_flag(logits, device), nan_flag(contour_logits, device),
         *(nan_flag(t, device) for t in more_logits)]
    ).tolist()
    raise_for_flags(flags[:3], logits, labels, contour_logits, ignore_index)
    for flag, t in zip(flags[3:], more_logits):
        raise_for_flags([False, flag, False], t, labels, None, ignore_index)


def _representable(value: int, dtype: torch.dtype) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


# ----------------------------------------------------------------------------------------------- dispatch
FAST_PATH = True  # use the compiled eager fast path where it serves the call (benchmarks switch it off for A/B)
_FAST: list = []  # [hmedn_fast._C.fused_loss, or None without it], resolved on the first call


def _fast_path():
    """The compiled CUDA fast path of the fused loss (``csrc/fused_loss.cpp``) set up with the Triton kernels, or
    None where the extension has no CUDA part or Triton is missing / too old."""
    if not _FAST:
        ext = extension()
        fast = getattr(ext, "fused_loss", None)
        if fast is not None:
            try:
                if _triton_too_old():
                    raise ImportError("triton < 3.3")
                from hmedn_fast.ops.triton import loss as fused
            except ImportError:
                fast = None
            else:
                fused.setup_fast_path(ext)
        _FAST.append(fast)
    return _FAST[0]


@functools.cache
def _triton_too_old() -> bool:
    import triton

    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 3)


def _triton_unavailable(
    logits: Tensor, labels: Tensor, weight: Tensor | None, contour_target: Tensor | None, class_weight: Tensor | None
) -> str | None:
    reason = triton_unavailable(logits, labels)
    if reason is not None:
        return reason
    if _triton_too_old():
        return "the fused loss kernel needs triton >= 3.3 (tuples inside kernels)"
    if logits.dtype == torch.float64:
        return "the fused kernel takes fp32/fp16/bf16 logits; float64 runs on the reference backend"
    for name, t in (("weight", weight), ("contour_target", contour_target), ("class_weight", class_weight)):
        if t is not None and t.requires_grad:
            return f"{name} requires grad; the fused kernel differentiates logits and contour_logits only"
    if labels.numel() // labels.shape[0] * logits.shape[1] >= 2**31:
        return "a sample above 2**31 elements (32-bit indices within a sample); use the reference backend"
    return None


def difficulty_guided_loss(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    contour_logits: Tensor | None = None,
    contour_target: Tensor | None = None,
    alpha: float = 1.0,
    class_weight: Tensor | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    backend: str | None = None,
    *,
    return_parts: bool = False,
    check_values: bool = True,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Difficulty-guided cross-entropy plus contour regression, ``L = L_s + alpha L_r`` (paper eq. 2-6).

    With ``v`` running over the voxels of the label grid (all samples), ``y_v`` the label, ``z_v`` the
    K logits, ``W_v`` the difficulty weight, ``nu`` the class weights, ``c_v`` the contour logit and
    ``C_v`` the contour target::

        L_s = (1/N) sum_v W_v nu[y_v] (logsumexp(z_v) - z_v[y_v])
        L_r = (1/N) sum_v (sigmoid(c_v) - C_v)^2

    ``N`` is the number of voxels whose label is not ``ignore_index`` (a mean over voxels, not over the
    sum of weights); ignored voxels add to neither term; if every voxel is ignored the mean is 0 (N is
    clamped to 1). Class weights multiply the weight map (``W_v nu[y_v]``); absent ones count as 1.

    Logits (and contour logits) may be at an integer fraction of the label resolution (deep
    supervision heads): the loss is then the one of the nearest-upsampled logits (label voxel ``i``
    reads logit voxel ``i // factor`` per dimension), computed without materialising the upsampled
    tensor by the fused kernel; the gradient of a logit voxel sums over its block.

    Args:
        logits: (N, K, H, W) or (N, K, D, H, W), fp32 / fp16 / bf16 / fp64, K >= 2; any strides (the
            fused kernel reads NC* and channels-last layouts in place).
        labels: (N, *spatial) uint8 / int16 / int32 / int64 in ``[0, K)`` or ``ignore_index``; each
            spatial size a multiple of the logits' one.
        weight: difficulty weight map ``W``, float (N, *spatial) or (N, 1, *spatial); None means 1.
        contour_logits: (N, 1, *logit spatial) or (N, *logit spatial) float contour logits (before the
            sigmoid), or None to drop ``L_r``; given together with ``contour_target``.
        contour_target: float ``C`` in [0, 1], (N, *spatial) or (N, 1, *spatial).
        alpha: weight of ``L_r``, finite and >= 0 (paper 1).
        class_weight: (K,) float class weights ``nu``, or None.
        ignore_index: label value whose voxels are left out, or None.
        reduction: ``"mean"`` (as above), ``"sum"`` (no 1/N), or ``"none"``: the per-voxel loss
            ``W nu CE + alpha (sigmoid(c) - C)^2`` as float (N, *spatial), 0 at ignored voxels.
        backend: None (automatic: triton on CUDA, else reference), ``"triton"`` or ``"reference"``.
        return_parts: also return ``L_s`` and ``L_r`` (mean / sum only).
        check_values: check label values and NaN logits before computing (one host synchronisation).
            Under ``torch.compile`` the reference backend skips this check (the fused op keeps it);
            with ``False`` out-of-range labels give meaningless values (the fused kernel clamps its
            reads, so never a memory fault). Plain CUDA calls (see ``csrc/fused_loss.cpp``) run the
            compiled fast path, checks included: the same kernels, launched and differentiated from C++.

    Returns:
        The loss: 0-dim for mean / sum, (N, *spatial) for none; float32 (float64 for float64
        logits). With ``return_parts``: ``(L, L_s, L_r)``. Gradients flow to ``logits`` and
        ``contour_logits`` (and, on the reference backend, to ``weight`` / ``contour_target``).

    Raises:
        TypeError / ValueError naming the argument for bad dtypes, shapes, devices, options, label
        values or NaN logits, before any loss kernel runs. RuntimeError for a forced unavailable backend.
    """
    if FAST_PATH and not torch.compiler.is_compiling() and (backend == "triton" or automatic("loss", backend)):
        fast = _fast_path()  # serves plain CUDA calls (csrc/fused_loss.cpp); None: this function's path below
        out = None if fast is None else fast(logits, labels, weight, contour_logits, contour_target, alpha,
                                             class_weight, ignore_index, reduction, return_parts, check_values)
        if out is not None:
            return out
    check_inputs(logits, labels, weight, contour_logits, contour_target, alpha, class_weight, ignore_index,
                 reduction, return_parts)
    if ignore_index is not None and not _representable(ignore_index, labels.dtype):
        ignore_index = None  # no label can equal it (e.g. -100 with uint8 labels)
    chosen = choose_backend(
        "loss",
        backend,
        [
            ("triton", lambda: _triton_unavailable(logits, labels, weight, contour_target, class_weight)),
            ("reference", lambda: None),
        ],
    )
    if chosen == "triton":
        from hmedn_fast.ops.triton import loss as fused

        return fused.difficulty_guided_loss(
            logits, labels, weight, contour_logits, contour_target, float(alpha), class_weight, ignore_index,
            reduction, return_parts=return_parts, check_values=check_values,
        )
    if check_values and not torch.compiler.is_compiling():
        check_input_values(logits, labels, contour_logits, ignore_index)
    return reference.difficulty_guided_loss(
        logits, labels, weight, contour_logits, contour_target, alpha, class_weight, ignore_index, reduction,
        return_parts,
    )


__all__ = ["difficulty_guided_loss"]
