"""Weights packed for the CUDA convolution kernel once per step (hmedn_fast.ops.geometry.TapPacks) instead of once per
call: the packs equal the per-call ones bit for bit, the kernels refuse a wrong pack, and an HR pathway's lean step
with them computes exactly what it computes without them."""
import pytest
import torch

from hmedn_fast.nn import HRPathway
from hmedn_fast.ops import conv_mma, geometry
from hmedn_fast.ops.geometry import TapPacks, pack_taps, pack_taps_many

from _fake_measure import count_calls
from _pathway_step import pathway_step

CL = torch.channels_last_3d


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
def test_packs_of_many_weights_equal_each_packed_alone(layout):
    weights = [torch.randn(32, 16, 3, 3, 3).contiguous(memory_format=layout).requires_grad_() for _ in range(3)]
    for in_first in (False, True):
        got = pack_taps_many(weights, torch.bfloat16, in_first)
        assert got.is_contiguous() and not got.requires_grad
        assert torch.equal(got, torch.stack([pack_taps(w, torch.bfloat16, in_first) for w in weights]))


def test_tap_packs_makes_the_input_gradient_layout_on_first_use():
    weights = [torch.randn(32, 32, 3, 3, 3) for _ in range(4)]
    packs = TapPacks(weights, torch.float16)
    assert packs._input_grad is None
    assert torch.equal(packs.forward[2], pack_taps(weights[2], torch.float16, False))
    assert torch.equal(packs.input_grad(3), pack_taps(weights[3], torch.float16, True))
    assert packs._input_grad is not None and packs.input_grad(1).data_ptr() == packs._input_grad[1].data_ptr()


def test_a_wrong_pack_is_refused_before_any_kernel():
    x = torch.randn(1, 32, 2, 4, 4).bfloat16()
    w = torch.randn(32, 32, 3, 3, 3)
    for bad in (torch.zeros(27, 32, 32), torch.zeros(27, 32, 16, dtype=torch.bfloat16),
                pack_taps(w, torch.bfloat16, False).transpose(1, 2)):
        with pytest.raises(ValueError, match="packed"):
            conv_mma.conv3x3_forward(x, w, 2, packed=bad)
        with pytest.raises(ValueError, match="packed"):
            conv_mma.conv3x3_input_grad(x, w, 2, packed=bad)


def test_no_packs_on_the_cpu_or_without_autocast():
    path = HRPathway(32, 32, num_blocks=2, dilations=(2, 4), spatial_dims=3)
    x = torch.randn(1, 32, 2, 16, 16)
    assert path._tap_packs(x, "middle") is None


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["lean", "middle", "blocks"])
def test_pathway_step_with_packs_equals_the_step_without(mode, monkeypatch):
    """Same kernels, same packed values: outputs and every gradient bit for bit; the blocks pack nothing themselves
    (only the projection's two calls remain), the pathway packs twice (forward, input-gradient layouts)."""
    step = pathway_step(mode)
    packed_calls = count_calls(monkeypatch, conv_mma, "pack_taps")
    many_calls = count_calls(monkeypatch, geometry, "pack_taps_many")
    with_packs = step()
    assert len(packed_calls) == 2 and len(many_calls) == 2
    monkeypatch.setattr(HRPathway, "_tap_packs", lambda self, x, mode: None)
    without = step()
    assert len(packed_calls) == 2 + 2 + (4 + {"lean": 0, "middle": 1, "blocks": 2}[mode]) * 3
    for a, b in zip(with_packs, without):
        assert a is not None and torch.equal(a, b)
