"""GradMeet: two backwards that send gradients to one tensor add them themselves. The protocol in both orders and with
one party (toy Functions), the Triton 1x1 input gradient added into another tensor (interpreted, float64 reference),
and a lean block with its dense-fusion term on one feature: the feature's gradient with the meet equals the one
autograd adds (interpreted; the term on the Triton kernels, the block on the CPU's ATen engine)."""
import pytest
import torch
from _pathway_step import pathway_step
from _rounding import assert_rounded_once

from hmedn_fast.ops.grad_meet import GradMeet

CL = torch.channels_last_3d


@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


class _Party(torch.autograd.Function):
    """y = scale * x; backward sends scale * g to x through the meet (GradMeet.settle)."""

    @staticmethod
    def forward(ctx, x, scale, meet, log):
        ctx.scale, ctx.meet, ctx.log = scale, meet, log
        if meet is not None:
            meet.join()
        return x * scale

    @staticmethod
    def backward(ctx, g):
        gx = g * ctx.scale
        meet = ctx.meet
        if meet is not None and meet.met:
            gx = meet.settle(gx)
            ctx.log.append("left" if gx is None else "took")
        elif meet is not None:
            assert meet.settle(gx) is gx  # not met: its own gradient
        return gx, None, None, None


@pytest.mark.parametrize("first", [0, 1])
def test_two_parties_return_the_sum_in_either_order(first):
    x = torch.randn(5, requires_grad=True)
    meet, log = GradMeet(), []
    a, b = _Party.apply(x, 2.0, meet, log), _Party.apply(x, 3.0, meet, log)
    assert meet.met
    # the backward of the output made last runs first: order the two by which one feeds the loss last
    first_out, second_out = (a, b) if first else (b, a)
    (second_out.sum() + (first_out * 1.0).sum() * 1.0).backward()
    assert log == ["left", "took"]
    torch.testing.assert_close(x.grad, torch.full_like(x, 5.0))
    assert meet.take() is None


def test_one_party_returns_its_own_gradient():
    x = torch.randn(4, requires_grad=True)
    meet, log = GradMeet(), []
    y = _Party.apply(x, 2.0, meet, log) + 3 * x
    assert not meet.met
    y.sum().backward()
    assert log == [] and torch.allclose(x.grad, torch.full_like(x, 5.0))


@pytest.mark.interpreted
def test_triton_1x1_input_gradient_added_into_another():
    from hmedn_fast.ops.strides import voxel_stride
    from hmedn_fast.ops.triton import conv1x1 as kernels

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 3, 4, 5, generator=g).bfloat16().contiguous(memory_format=CL)
    w = torch.randn(12, 16, 1, 1, 1, generator=g).bfloat16().float()
    gy = torch.randn(2, 12, 3, 4, 5, generator=g).bfloat16().contiguous(memory_format=CL)
    other = torch.randn(2, 16, 3, 4, 5, generator=g).bfloat16().contiguous(memory_format=CL)
    want = other.double() + torch.einsum("nozyx,oi->nizyx", gy.double(), w.double().flatten(1))
    into = other.clone()
    assert kernels.dense_like_dx(into, x) and not kernels.dense_like_dx(into.contiguous(), x)
    dx, _, _ = kernels.backward(gy, voxel_stride(gy), x, voxel_stride(x), w, True, False, False, add_to=into)
    assert dx is into
    assert_rounded_once(dx, want, torch.bfloat16)


@pytest.mark.interpreted
def test_fusion_term_second_adds_into_the_other_gradient_in_its_kernel(monkeypatch):
    """The other party (made after the term, so its backward runs first) leaves a channels-last gradient; the term's
    Triton backward adds its input gradient into it (add_to) and returns the sum: x's gradient vs float64."""
    from hmedn_fast.ops.conv1x1 import conv1x1_add
    from hmedn_fast.ops.triton import conv1x1 as kernels

    monkeypatch.setenv("HMEDN_BACKEND_CONV1X1_ADD", "triton")
    into = []
    real = kernels.backward
    monkeypatch.setattr(kernels, "backward", lambda *a, add_to=None, **k: into.append(add_to) or real(*a, add_to=add_to,
                                                                                                      **k))
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 16, 3, 4, 5, generator=g).bfloat16().contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(8, 16, 1, 1, 1, generator=g).bfloat16().float()
    gy = torch.randn(1, 8, 3, 4, 5, generator=g).bfloat16()
    gp = torch.randn(1, 16, 3, 4, 5, generator=g).bfloat16().contiguous(memory_format=CL)
    meet, log = GradMeet(), []
    out = conv1x1_add(None, x, w, meet=meet)
    party = _Party.apply(x, 2.0, meet, log)
    ((out.float() * gy.float()).sum() + (party.float() * gp.float()).sum()).backward()
    assert log == ["left"] and len(into) == 1 and into[0] is not None
    want = 2 * gp.double() + torch.einsum("nozyx,oi->nizyx", gy.double(), w.double().flatten(1))
    assert_rounded_once(x.grad, want, torch.bfloat16)


@pytest.mark.interpreted
def test_block_and_fusion_term_meeting_on_one_feature_equal_autograd(monkeypatch):
    from hmedn_fast.nn import ResidualDilatedBlock
    from hmedn_fast.nn.lean import DenseFusionSum

    monkeypatch.setenv("HMEDN_BACKEND_CONV1X1_ADD", "triton")
    torch.manual_seed(0)
    block = ResidualDilatedBlock(8, (1, 2), spatial_dims=3).to(memory_format=CL).bfloat16()
    block.checkpoint = "lean"
    fuse = torch.nn.Conv3d(16, 8, 1).bfloat16()
    feat = torch.randn(1, 8, 3, 4, 4).bfloat16().contiguous(memory_format=CL)
    gy = torch.randn(1, 8, 3, 4, 4).bfloat16()

    def feature_grad(meet: GradMeet | None) -> torch.Tensor:
        x = feat.clone().requires_grad_()
        fusion = DenseFusionSum(fuse)
        fusion.add(x, meet)
        y = block(x, meet=meet)
        fusion.add(y.contiguous(memory_format=CL))  # the CPU block's output layout is ATen's choice
        (fusion.result().float() * gy.float()).sum().backward()
        if meet is not None:
            assert meet.met and meet.take() is None
        return x.grad

    want, got = feature_grad(None), feature_grad(GradMeet())
    assert got.dtype == torch.bfloat16
    # the two gradients summed once in float32 (in the kernel) vs autograd's bf16 add of two rounded ones
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * want.float().abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["lean", "middle"])
def test_pathway_with_meets_equals_autograd_adds_on_cuda(mode, monkeypatch):
    """The HR pathway's lean step: every block output's two gradients meet (the next block's backward runs first and
    leaves its channels-last input gradient, the fusion term's kernel adds into it); gradients as with the meets
    off (autograd's adds) within bf16 rounding of the sums."""
    from hmedn_fast.ops.triton import conv1x1 as kernels

    into = []
    real = kernels.backward
    monkeypatch.setattr(kernels, "backward", lambda *a, add_to=None, **k: into.append(add_to is not None)
                        or real(*a, add_to=add_to, **k))
    step = pathway_step(mode)
    got = step()
    assert into.count(True) == 3  # the projection's output and the first two blocks' outputs
    monkeypatch.setattr(GradMeet, "met", property(lambda self: False))
    want = step()
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=2 ** -6 * b.float().abs().max().item())
