"""hmedn_fast.ops.conv.conv_input_grad (input gradient without the forward's input) against ATen's
convolution_backward in float64: 2D / 3D, strides (incl. sizes the striding rounds down), paddings, dilations,
groups, channels-last gradients; a shape that does not fit raises."""
from __future__ import annotations

import pytest
import torch

from hmedn_fast.ops.conv import conv_input_grad


@pytest.mark.parametrize("shape, c_out, k, stride, padding, dilation, groups", [
    ((2, 6, 7, 8, 9), 4, 3, 1, 1, 1, 1), ((1, 6, 9, 7, 8), 4, 3, 1, 2, 2, 2), ((1, 4, 9, 10, 11), 6, 3, 2, 1, 1, 1),
    ((1, 4, 8, 9, 10), 2, 1, 1, 0, 1, 1), ((2, 3, 11, 12), 5, 3, 2, 0, 1, 1), ((1, 4, 10, 9), 4, 3, 1, 3, 3, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_input_gradient_equals_aten(shape, c_out, k, stride, padding, dilation, groups, channels_last):
    nd = len(shape) - 2
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(c_out, shape[1] // groups, *([k] * nd), dtype=torch.float64)
    conv = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv3d
    y = conv(x, w, None, stride, padding, dilation, groups)
    gy = torch.randn(y.shape, dtype=torch.float64)
    if channels_last:
        gy = gy.to(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    want = torch.ops.aten.convolution_backward(gy, x, w, None, [stride] * nd, [padding] * nd, [dilation] * nd, False,
                                               [0] * nd, groups, [True, False, False])[0]
    got = conv_input_grad(gy, w, x.shape, [stride] * nd, [padding] * nd, [dilation] * nd, groups)
    assert got.shape == x.shape and got.dtype == gy.dtype
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_shape_that_does_not_fit_raises():
    gy = torch.randn(1, 4, 5, 5, 5)
    with pytest.raises(ValueError, match="input_shape"):
        conv_input_grad(gy, torch.randn(4, 3, 3, 3, 3), (1, 3, 9, 9, 9), [1] * 3, [1] * 3, [1] * 3, 1)
