"""``copy_channels_(dst, src)``: copy between channel slices of channels-last tensors.

The lean dense block (:mod:`hmedn_fast.nn.dense_lean`) writes every layer's output into a slice of one shared
buffer and reads gradient slices back out. Backends (``backend=`` or ``HMEDN_BACKEND_COPY_CHANNELS`` force one):

- ``"triton"`` (:mod:`hmedn_fast.ops.triton.copy`): one launch moving (rows x channels) tiles; CUDA (or the CPU
  under ``TRITON_INTERPRET=1``), one dtype, both tensors with channel stride 1 and spatial axes that flatten to
  one stride, outside ``torch.compile``. The automatic choice wherever it runs.
- ``"reference"``: ``Tensor.copy_``; for same-dtype channels-innermost tensors through 8-byte-word views (PyTorch's
  strided copy costs per element, so a bf16 slice moves 4x fewer elements).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hmedn_fast.ops.dispatch import choose_backend, triton_unavailable
from hmedn_fast.ops.strides import flat_spatial_stride


def _ncs(t: Tensor) -> tuple[int, int, int] | None:
    s = flat_spatial_stride(t, 2) if t.ndim > 2 else None
    return None if s is None else (t.stride(0), t.stride(1), s)


def copy_channels_(dst: Tensor, src: Tensor, backend: str | None = None) -> Tensor:
    """``dst.copy_(src)`` for two (N, C, *spatial) tensors of one shape (dtypes may differ), typically channel
    slices of channels-last tensors. Returns dst.

    Raises:
        ValueError: shapes differ. RuntimeError: a forced backend cannot run these tensors.
    """
    if dst.shape != src.shape:
        raise ValueError(f"dst and src must have one shape, got {tuple(dst.shape)} and {tuple(src.shape)}")
    strides = _ncs(dst), _ncs(src)

    def triton_unavailable_here() -> str | None:
        reason = triton_unavailable(dst, src)
        if reason is not None:
            return reason
        if None in strides or strides[0][1] != 1 or strides[1][1] != 1:
            return "both tensors need channel stride 1 and spatial axes that flatten to one stride"
        if dst.device != src.device or dst.dtype != src.dtype:
            return "dst and src differ in device or dtype"
        if torch.compiler.is_compiling():
            return "inside torch.compile"
        return None

    name = choose_backend("copy_channels", backend, [("triton", triton_unavailable_here), ("reference", lambda: None)])
    if name == "triton":
        from hmedn_fast.ops.triton.copy import copy_channels_ as kernel
        return kernel(dst, src, strides[0], strides[1])
    if dst.dtype == src.dtype and dst.element_size() < 8 and dst.ndim > 2 and dst.stride(1) == 1 == src.stride(1):
        perm = (0, *range(2, dst.ndim), 1)
        try:
            words = dst.permute(perm).view(torch.int64), src.permute(perm).view(torch.int64)
        except RuntimeError:  # not a whole number of words
            return dst.copy_(src)
        words[0].copy_(words[1])
        return dst
    return dst.copy_(src)
