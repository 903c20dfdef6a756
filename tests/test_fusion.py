"""Inference fusion (BatchNorm folded into convolutions): equal to eval mode for every model, the fold formula
against a float64 reference, non-foldable norms left in place, the original model untouched, ONNX-standard ops."""
import pytest
import torch
from torch import nn

from hmedn_fast.models import MODELS, create_model, list_models
from hmedn_fast.nn import ResidualDilatedBlock
from hmedn_fast.nn.blocks import DenseLayer
from hmedn_fast.nn.fusion import fold_batch_norm, fuse_for_inference

SIZE = {2: (19, 29), 3: (9, 13, 10)}


def randomise_norm_statistics(model: nn.Module, seed: int = 0) -> None:
    """Give every norm non-trivial running statistics and affine parameters (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)


def count(model: nn.Module, kind) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", list_models())
def test_fused_equals_eval_mode(name):
    model = create_model(name)
    randomise_norm_statistics(model)
    model.eval()
    fused = model.fuse_for_inference()
    x = torch.randn(1, model.in_channels, *SIZE[MODELS[name].spatial_dims])
    with torch.no_grad():
        ref, out = model(x), fused(x)
    torch.testing.assert_close(out.seg, ref.seg, rtol=1e-5, atol=1e-5 * ref.seg.abs().max().item())
    if ref.contour is not None:
        torch.testing.assert_close(out.contour, ref.contour, rtol=1e-5, atol=1e-5 * ref.contour.abs().max().item())
    for a, b in zip(out.aux, ref.aux):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    # every post-activation BatchNorm was folded; only the pre-activation ones of dense layers stay
    kept = count(fused, nn.BatchNorm2d) + count(fused, nn.BatchNorm3d)
    assert kept == count(fused, DenseLayer)
    assert count(model, nn.BatchNorm2d) + count(model, nn.BatchNorm3d) > kept


def test_fold_formula_against_float64_reference():
    conv = nn.Conv3d(4, 6, 3, padding=2, dilation=2, bias=True)
    bn = nn.BatchNorm3d(6, eps=1e-3)
    randomise_norm_statistics(bn, seed=3)
    fused = fold_batch_norm(conv, bn)
    x = torch.randn(2, 4, 7, 8, 9, dtype=torch.float64)
    w, b = conv.weight.double(), conv.bias.double()
    y = torch.nn.functional.conv3d(x, w, b, padding=2, dilation=2)
    mean, var = bn.running_mean.double(), bn.running_var.double()
    ref = ((y - mean.view(1, -1, 1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1, 1) + 1e-3)
           * bn.weight.double().view(1, -1, 1, 1, 1) + bn.bias.double().view(1, -1, 1, 1, 1))
    assert fused.weight.dtype == torch.float32 and conv.bias is not fused.bias
    torch.testing.assert_close(fused.double()(x), ref, rtol=1e-6, atol=1e-6)


def test_instance_and_group_norm_are_left_and_still_equal():
    for norm, kind in (("instance", nn.InstanceNorm2d), ("group", nn.GroupNorm)):
        block = ResidualDilatedBlock(8, (2, 3), spatial_dims=2, norm=norm)
        randomise_norm_statistics(block)
        fused = fuse_for_inference(block)
        assert count(fused, kind) == 2
        x = torch.randn(2, 8, 13, 11)
        torch.testing.assert_close(fused(x), block.eval()(x))


def test_original_is_untouched_and_fused_is_frozen():
    model = create_model("dilnet3", in_channels=2, num_classes=3)
    randomise_norm_statistics(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    fused = model.fuse_for_inference()
    assert model.training and not fused.training and fused.hmedn_fused
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert count(model, nn.BatchNorm2d) > 0 and count(fused, nn.BatchNorm2d) == 0
    assert not any(p.requires_grad for p in fused.parameters())


def test_fused_model_exports_with_standard_ops(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = create_model("dilnet3", in_channels=1, num_classes=2, channels=8, num_blocks=2)
    fused = model.fuse_for_inference()

    class SegOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = fused

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).seg

    path = tmp_path / "m.onnx"
    torch.onnx.export(SegOnly(), (torch.randn(1, 1, 16, 16),), str(path), dynamo=False, opset_version=17)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops and "Relu" in ops


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse_for_inference("dilnet1")
    with pytest.raises(TypeError, match="cannot fold GroupNorm"):
        fold_batch_norm(nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4))
