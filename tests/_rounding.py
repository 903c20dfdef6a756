"""Shared check of the Triton convolution tests: a bf16/fp16 result equals its float64 truth up to float32
accumulation and one rounding to its dtype."""
from __future__ import annotations

import torch


def assert_rounded_once(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """``got`` (channels-last 2D / 3D, ``dtype``) equals ``want`` (float64) within half a unit in the last place on the
    GPU (round to nearest) and one unit under the interpreter, whose float32 -> bf16 / fp16 cast truncates (Triton
    3.9: checked against torch's casts); shape, dtype, finiteness and layout checked too."""
    assert got.shape == want.shape and got.dtype == dtype and torch.isfinite(got).all()
    assert got.is_contiguous(memory_format=torch.channels_last_3d if got.ndim == 5 else torch.channels_last)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)  # relative spacing at a mantissa of 1.0
    rel = ulp if got.is_cpu else ulp / 2
    torch.testing.assert_close(got.double(), want, rtol=rel, atol=1e-5 * want.abs().max().item())
