"""Tensor-core 3x3x3 convolution of the HR pathway's shape (``kernels/conv3x3.cu``, CUDA builds of the extension):
"same" padding, stride 1, 32 -> 32 channels, bf16/fp16 channels-last volumes, float32 accumulation. Each block
copies an input plane with its halo into shared memory and feeds all nine in-plane taps from it (the Triton kernels
load every shifted tile separately): once per kernel depth, or, in the column kernel of sm_90a builds, once for the
three output planes it feeds (:func:`tile_rows`).

:func:`conv3x3_forward` is ``F.conv3d(x, weight, padding=d, dilation=d)``; :func:`conv3x3_input_grad` its input
gradient (the same kernel on the flipped, channel-swapped weight); :func:`conv3x3_wgrad` its weight gradient (a second
kernel on the same halo tiles, float32 partial sums per block reduced by :func:`hmedn_fast.ops.partials.sum_partials`).
:func:`unsupported` says why a call cannot run.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from hmedn_fast.ops import _ext
from hmedn_fast.ops.geometry import pack_taps
from hmedn_fast.ops.partials import sum_partials
from hmedn_fast.ops.strides import voxel_stride
from hmedn_fast.ops.triton.launch import multiprocessors  # torch only: no Triton import

CHANNELS = 32


@functools.cache
def _runs_on(device: int) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0) and _ext.extension().conv3x3_mma_runs_on(device)


@functools.cache
def _column_runs_on(device: int) -> bool:
    return _ext.extension().conv3x3_mma_column_runs_on(device)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _built() -> bool:
    """Whether the extension was built with its CUDA convolution kernels."""
    ext = _ext.extension()
    return ext is not None and hasattr(ext, "conv3x3_mma_")


def available(device: torch.device) -> bool:
    """Whether the extension's CUDA convolution kernels can run on ``device`` (a CUDA device)."""
    return _built() and device.type == "cuda" and _runs_on(_index(device))


def _volume_unsupported(t: Tensor, name: str, dilation: int) -> str | None:
    """Why the kernels cannot read the volume ``t`` (N, 32, D, H, W) at this dilation, or None."""
    if not _built():
        return "the extension was built without its CUDA kernels"
    ext = _ext.extension()
    if not t.is_cuda:
        return f"{name} is not a CUDA tensor"
    if t.dtype not in (torch.bfloat16, torch.float16):
        return f"{name} must be bfloat16 or float16"
    if t.ndim != 5 or t.shape[1] != CHANNELS:
        return "only 3x3x3 convolutions of 32 -> 32 channels"
    if not _runs_on(_index(t.device)):
        return "the extension has no kernel image for this GPU (compute capability 8.0 or newer, built for it)"
    vs = voxel_stride(t)
    if vs is None or vs % 8 or t.data_ptr() % 16 or t.numel() == 0:
        return f"{name} must be channels-last (or a channel slice of one at a multiple of 8 channels), 16-byte aligned"
    if not 1 <= int(dilation) <= ext.conv3x3_mma_max_dilation():
        return f"dilation {dilation} outside [1, {ext.conv3x3_mma_max_dilation()}]"
    if t.shape[0] > 65535 or t.shape[2] > 65535 or t.numel() >= 2**31:
        return "batch and depth must be at most 65535, and fewer than 2**31 elements"
    return None


def unsupported(x: Tensor, weight: Tensor, dilation: int, out: Tensor | None = None) -> str | None:
    """None when :func:`conv3x3_forward` can run ``x`` (N, 32, D, H, W) with ``weight`` (32, 32, 3, 3, 3) and
    ``dilation`` (into ``out`` when given); else the reason. The same holds for :func:`conv3x3_input_grad` with the
    output gradient as ``x``."""
    reason = _volume_unsupported(x, "x", dilation)
    if reason is None and (not weight.is_floating_point() or weight.device != x.device
                           or tuple(weight.shape) != (CHANNELS, CHANNELS, 3, 3, 3)):
        reason = "weight must be a floating-point (32, 32, 3, 3, 3) tensor on x's device"
    if reason is None and out is not None:
        ovs = voxel_stride(out)
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or ovs is None or ovs % 2 \
                or out.data_ptr() % 4:
            reason = "out must be like x: channels innermost, an even voxel stride, 4-byte aligned"
    return reason


def wgrad_unsupported(grad: Tensor, x: Tensor, dilation: int) -> str | None:
    """None when :func:`conv3x3_wgrad` can take ``grad`` and ``x`` (each under the contract of x in
    :func:`unsupported`, one shape and dtype); else the reason."""
    reason = _volume_unsupported(x, "x", dilation) or _volume_unsupported(grad, "grad", dilation)
    if reason is None and (grad.shape != x.shape or grad.dtype != x.dtype or grad.device != x.device):
        reason = "grad and x must have one shape, dtype and device"
    return reason


TILE = 16  # the kernel's output tile width, and its height unless tall tiles or columns are taken
TALL_TILES = True  # 32-row output tiles where tile_rows says so (benchmarks switch it off to compare)
COLUMNS = True  # the column kernel where the build has it for the device (benchmarks switch it off to compare)
COLUMN_ROWS = 8


def tile_rows(height: int, dilation: int, device: torch.device) -> int:
    """Rows of the kernel's output tiles for volumes of this height at this dilation on ``device``:
    :data:`COLUMN_ROWS` (8) where the extension has the column kernel for the device (sm_90a builds): each block
    computes output planes ``dilation`` apart from one copy of each input plane, all three kernel depths as one wgmma.
    Otherwise the per-depth kernel: 32 where ``height`` is a multiple of 32 and ``dilation`` >= 2, else 16. A 32 x 16
    tile (8 warps, 2 blocks per SM) copies fewer halo rows and weights per output than a 16 x 16 one (numbers in
    ``docs/decisions/blocks.md``, stops 35-37)."""
    if COLUMNS and device.type == "cuda" and _built() and _column_runs_on(_index(device)):
        return COLUMN_ROWS
    return 32 if TALL_TILES and height % 32 == 0 and dilation >= 2 else TILE


def _run(x: Tensor, packed: Tensor, dilation: int, out: Tensor | None, flip: bool,
         accumulate: bool = False, stats: Tensor | None = None) -> Tensor:
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last_3d)
    _ext.extension().conv3x3_mma_(x, packed, out, int(dilation), flip, accumulate, stats,
                                  tile_rows(x.shape[3], int(dilation), x.device))
    return out


def tile_stats_shape(x: Tensor, dilation: int) -> tuple[int, int, int, int] | None:
    """Shape of the per-tile statistics :func:`conv3x3_forward` can write for input ``x`` (N, 32, D, H, W) at this
    dilation: (N, D * H / R * W / 16, 2, 32) with R = :func:`tile_rows` (H, dilation, x's device), or None when H or
    W is not a multiple of 16 (edge tiles would be partial)."""
    n, _, d, h, w = x.shape
    if h % TILE or w % TILE:
        return None
    return n, d * (h // tile_rows(h, dilation, x.device)) * (w // TILE), 2, CHANNELS


def _packed(packed: Tensor | None, weight: Tensor, dtype: torch.dtype, in_first: bool) -> Tensor:
    """``packed`` when given (checked against the kernel's B operand: (27, 32, 32) contiguous in ``dtype`` on the
    weight's device), else ``weight`` packed now."""
    if packed is None:
        return pack_taps(weight, dtype, in_first)
    if packed.shape != (27, CHANNELS, CHANNELS) or packed.dtype != dtype or not packed.is_contiguous() \
            or packed.device != weight.device:
        raise ValueError(f"packed must be a contiguous (27, {CHANNELS}, {CHANNELS}) {dtype} tensor on the weight's "
                         f"device, got {tuple(packed.shape)} {packed.dtype} on {packed.device}")
    return packed


def conv3x3_forward(x: Tensor, weight: Tensor, dilation: int, out: Tensor | None = None,
                    stats: Tensor | None = None, packed: Tensor | None = None) -> Tensor:
    """``F.conv3d(x, weight, None, 1, dilation, dilation)``.

    Args:
        x: (N, 32, D, H, W) bf16/fp16, channels innermost (see :func:`unsupported`).
        weight: (32, 32, 3, 3, 3) floating point, rounded to x's dtype (as autocast casts it).
        dilation: kernel dilation (the padding equals it).
        out: None, or an (N, 32, D, H, W) tensor of x's dtype with channels innermost (e.g. a channel slice of a
            channels-last buffer) to write into.
        stats: None, or a float32 tensor of :func:`tile_stats_shape` (x's H and W multiples of 16) that receives, for
            each R x 16 output tile of each plane (R = :func:`tile_rows` (H, dilation, device); row ``(n * D + z) * tiles +
            tile``), every channel's mean and sum of squared deviations over the tile's outputs as stored: a batch
            norm's statistics without reading the output again (the layout of
            :func:`hmedn_fast.ops.triton.norm.forward`'s ``part``).
        packed: None, or ``weight`` already packed (:func:`hmedn_fast.ops.geometry.pack_taps` in x's dtype, not
            ``in_first``; e.g. from a :class:`~hmedn_fast.ops.geometry.TapPacks`), used instead of packing it here.
    Returns:
        (N, 32, D, H, W) in x's dtype (channels-last when allocated here).
    """
    return _run(x, _packed(packed, weight, x.dtype, False), dilation, out, False, stats=stats)


def conv3x3_input_grad(grad: Tensor, weight: Tensor, dilation: int, add_to: Tensor | None = None,
                       packed: Tensor | None = None) -> Tensor:
    """Input gradient of :func:`conv3x3_forward` for output gradient ``grad`` (N, 32, D, H, W) (same contract as x):
    the convolution of ``grad`` with the weight flipped along its kernel axes (the kernel reads the taps in reverse)
    and its channel axes swapped; the weight is rounded to grad's dtype. Returns (N, 32, D, H, W) channels-last in
    grad's dtype; with ``add_to`` (a tensor like ``out`` of :func:`unsupported`), ``add_to`` plus the gradient,
    written into it (each element's float32 sum rounded once) and returned. ``packed``: None, or the weight already
    packed ``in_first`` in grad's dtype (see :func:`conv3x3_forward`)."""
    return _run(grad, _packed(packed, weight, grad.dtype, True), dilation, add_to, True, add_to is not None)


# Blocks per kernel depth of the weight gradient: two blocks fit an SM (shared memory: two stages; mma.sync form: 168
# registers x 6 warps), three depths share it.
_WGRAD_BLOCKS_PER_SM = 2


def conv3x3_wgrad(grad: Tensor, x: Tensor, dilation: int) -> Tensor:
    """Weight gradient of :func:`conv3x3_forward` (``F.conv3d(x, w, padding=dilation, dilation=dilation)``).

    Args:
        grad: (N, 32, D, H, W) output gradient, bf16/fp16, channels innermost (see :func:`unsupported`).
        x: (N, 32, D, H, W) the convolution's input, grad's dtype, same contract.
        dilation: the convolution's dilation.
    Returns:
        (32, 32, 3, 3, 3) float32 (float32 accumulation; the per-block partial sums added in float32).
    """
    sms = multiprocessors(x.device.index if x.device.index is not None else torch.cuda.current_device())
    tiles = x.shape[0] * x.shape[2] * -(-x.shape[3] // 16) * -(-x.shape[4] // 16)
    splits = max(1, min(tiles, -(-_WGRAD_BLOCKS_PER_SM * sms // 3)))
    part = torch.empty((splits, 27, CHANNELS, CHANNELS), dtype=torch.float32, device=x.device)
    _ext.extension().conv3x3_mma_wgrad_(x, grad, part, int(dilation))
    return sum_partials(part, (1, 2, 0)).view(CHANNELS, CHANNELS, 3, 3, 3)  # (tap, out, in) summed into (out, in, tap)


__all__ = ["available", "conv3x3_forward", "conv3x3_input_grad", "conv3x3_wgrad", "unsupported", "wgrad_unsupported"]
