"""ONNX / TorchScript / TensorRT export: checker, standard ops, ONNX Runtime parity for every model, CLI."""
from __future__ import annotations

import onnx
import pytest
import torch
from onnx import helper

from hmedn_fast.export import build_tensorrt_engine, check_profile, check_standard_ops, export_onnx, export_torchscript
from hmedn_fast.export.cli import main as export_main
from hmedn_fast.export.onnx import onnx_parity
from hmedn_fast.models import create_model, list_models
from hmedn_fast.models.io import save_model

try:
    import tensorrt  # noqa: F401

    TRT_MISSING = None
except ImportError as exc:
    TRT_MISSING = f"tensorrt is not importable here ({exc})"


def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that a wrong fold or a train-mode export
    shows up (fresh models have mean 0 / var 1 / weight 1 / bias 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def small_input(model, batch: int = 2) -> torch.Tensor:
    """Non-multiple spatial sizes that differ from the tracing example (dynamic batch and spatial axes)."""
    spatial = (40, 37) if model.spatial_dims == 2 else (20, 17, 18)
    return torch.randn((batch, model.in_channels) + spatial)


@pytest.mark.parametrize("name", list_models())
def test_onnx_parity_every_model(name, tmp_path):
    model = randomize_norms(create_model(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / f"{name}.onnx")  # runs onnx.checker + standard-op check
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert [o.name for o in proto.graph.output] == ["seg"] + (["contour"] if model.contour_head is not None else [])
    # batch 2 (2D) and sizes unlike the tracing example: dynamic axes; onnx_parity also compares shapes
    assert onnx_parity(model, path, small_input(model, batch=2 if model.spatial_dims == 2 else 1)) < 1e-4
    # export must not touch the model (mode, weights, statistics)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_onnx_parity_detects_wrong_weights(tmp_path):
    model = randomize_norms(create_model("dilnet3"))
    path = export_onnx(model, tmp_path / "m.onnx")
    with torch.no_grad():
        model.net.head.bias.add_(1e-3)
    assert onnx_parity(model, path, small_input(model)) == pytest.approx(1e-3, rel=1e-2)


def test_export_unfused_matches_too(tmp_path):
    model = randomize_norms(create_model("hmedn_2d", widths=(8, 12, 16, 24), growth_rates=4, hr_channels=8))
    path = export_onnx(model, tmp_path / "m.onnx", fuse=False, opset=18)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" in ops or "Mul" in ops  # norms are exported, not folded
    assert onnx_parity(model, path, small_input(model, batch=1)) < 1e-4


def test_export_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model must be an hmedn_fast SegmentationModel"):
        export_onnx(torch.nn.Conv2d(1, 1, 1), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="opset must be an int >= 17"):
        export_onnx(create_model("dilnet3"), tmp_path / "x.onnx", opset=16)


def test_check_standard_ops_flags_custom_domains():
    node = helper.make_node("FusedConv", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(ValueError, match="non-standard ops"):
        check_standard_ops(proto)
    old = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ValueError, match="opset"):
        check_standard_ops(old)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("name, overrides", [("hmedn_2d", dict(widths=(8, 12, 16, 24), growth_rates=4, hr_channels=8)),
                                             ("unet_3d", dict(widths=(4, 8, 16)))])
def test_torchscript_any_shape(name, overrides, tmp_path):
    model = randomize_norms(create_model(name, **overrides))
    traced = torch.jit.load(str(export_torchscript(model, tmp_path / "m.pt")))
    x = small_input(model)
    with torch.no_grad():
        outs, ref = traced(x), model(x)
    assert (outs[0] - ref.seg).abs().max() < 1e-4
    if ref.contour is not None:
        assert (outs[1] - ref.contour).abs().max() < 1e-4


def test_tensorrt_profile_checks():
    assert check_profile((1, 4, 16, 16, 16), (2, 4, 64, 64, 64), (2, 4, 128, 128, 128))[1] == (2, 4, 64, 64, 64)
    with pytest.raises(ValueError, match="min_shape <= opt_shape <= max_shape"):
        check_profile((1, 4, 64, 64), (1, 4, 32, 32), (1, 4, 128, 128))
    with pytest.raises(ValueError, match="same channel count"):
        check_profile((1, 4, 16, 16), (1, 5, 16, 16), (1, 4, 16, 16))
    with pytest.raises(ValueError, match="min_shape must be"):
        check_profile((1, 4), (1, 4, 16, 16), (1, 4, 16, 16))
    with pytest.raises(ValueError, match="same length"):
        check_profile((1, 4, 16, 16), (1, 4, 16, 16, 16), (1, 4, 16, 16, 16))


def test_tensorrt_build_argument_errors(tmp_path):
    shapes = dict(min_shape=(1, 5, 16, 16), opt_shape=(1, 5, 32, 32), max_shape=(1, 5, 32, 32))
    with pytest.raises(ValueError, match="precision must be one of"):
        build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine", precision="int8", **shapes)
    with pytest.raises(ValueError, match="does not exist"):
        build_tensorrt_engine(tmp_path / "missing.onnx", tmp_path / "m.engine", **shapes)


@pytest.mark.skipif(TRT_MISSING is None, reason="tensorrt is installed: the missing-package path cannot be shown")
def test_tensorrt_missing_package_is_a_clear_error(tmp_path):
    path = export_onnx(create_model("dilnet3"), tmp_path / "m.onnx")
    with pytest.raises(ImportError, match="needs the 'tensorrt' Python package"):
        build_tensorrt_engine(path, tmp_path / "m.engine", min_shape=(1, 5, 16, 16), opt_shape=(1, 5, 32, 32),
                              max_shape=(1, 5, 32, 32))


@pytest.mark.cuda
@pytest.mark.skipif(TRT_MISSING is not None, reason=TRT_MISSING or "")
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-2), ("fp16", 0.1)])
def test_tensorrt_engine_matches_pytorch(precision, tol, tmp_path):
    from hmedn_fast.infer.engines import TensorRTEngine

    model = randomize_norms(create_model("unet_3d", widths=(8, 16, 32)))
    onnx_path = export_onnx(model, tmp_path / "m.onnx")
    engine_path = build_tensorrt_engine(onnx_path, tmp_path / "m.engine", precision=precision,
                                        min_shape=(1, 4, 8, 8, 8), opt_shape=(2, 4, 32, 32, 32),
                                        max_shape=(2, 4, 32, 32, 32))
    engine = TensorRTEngine(engine_path)
    x = torch.randn(2, 4, 24, 32, 20, device="cuda")
    seg, _ = engine(x)
    with torch.no_grad():
        ref = model.cuda()(x).seg
    assert (seg - ref).abs().max().item() < tol * ref.abs().max().item()
    with pytest.raises(ValueError, match="outside the engine's optimisation profile"):
        engine(torch.randn(1, 4, 64, 64, 64, device="cuda"))


@pytest.fixture
def checkpoint(tmp_path):
    return save_model(randomize_norms(create_model("hmedn_2d", widths=(8, 12, 16, 24), growth_rates=4,
                                                   hr_channels=8, hr_blocks=2)), tmp_path / "model.pt")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_cli_onnx_and_torchscript(checkpoint, tmp_path, capsys):
    assert export_main(["--model", str(checkpoint), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    assert "onnx.checker ok" in capsys.readouterr().out
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    assert export_main(["--model", str(checkpoint), "--format", "torchscript", "--output",
                        str(tmp_path / "m.pt")]) == 0
    assert isinstance(torch.jit.load(str(tmp_path / "m.pt")), torch.jit.ScriptModule)


def test_cli_errors(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert export_main(["--model", str(bad), "--output", str(tmp_path / "m.onnx")]) == 2
    assert "cannot read model checkpoint" in capsys.readouterr().err
    assert export_main(["--model", str(checkpoint), "--output", str(tmp_path / "m.onnx"), "--opset", "11"]) == 2
    assert "opset must be" in capsys.readouterr().err
    if TRT_MISSING is not None:
        assert export_main(["--model", str(checkpoint), "--format", "tensorrt", "--output",
                            str(tmp_path / "m.engine"), "--window", "32"]) == 2
        assert "tensorrt" in capsys.readouterr().err
