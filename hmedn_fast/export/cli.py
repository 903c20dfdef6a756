"""``hmedn export``: write a checkpoint's model as ONNX, a TensorRT engine, or TorchScript.

    hmedn export --model CKPT --format onnx --output model.onnx [--opset 17] [--no-fuse]
    hmedn export --model CKPT --format tensorrt --output model.engine [--precision fp16|bf16|fp32]
                 [--window 128 128 128] [--batch 4] [--min-window 16 16 16]
    hmedn export --model CKPT --format torchscript --output model.pt

ONNX exports are checked (onnx.checker, standard ops) and compared with PyTorch through ONNX Runtime on a
random input (the largest logit difference is printed; above ``--atol`` the exit status is 1). TensorRT
exports write the ONNX file next to the engine (``<output>.onnx``) and build one optimisation profile:
min (1, C, *min_window), opt = max (batch, C, *window). Exit status 2: unusable checkpoint or options, or a
missing package (tensorrt).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

FORMATS = ("onnx", "tensorrt", "torchscript")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``hmedn export`` (module doc)."""
    p.add_argument("--model", required=True, help="checkpoint written by save_model / training")
    p.add_argument("--format", choices=FORMATS, default="onnx")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fold BatchNorm into the convolutions (default: on)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest ONNX Runtime vs PyTorch logit difference")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16", help="TensorRT precision")
    p.add_argument("--window", type=int, nargs="+", default=None,
                   help="TensorRT opt/max spatial size (one int or one per axis; default 128 in 3D, 512 in 2D)")
    p.add_argument("--min-window", type=int, nargs="+", default=None,
                   help="TensorRT min spatial size (default: the model's size multiple)")
    p.add_argument("--batch", type=int, default=1, help="TensorRT opt/max batch")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on an ``argparse`` subparsers object (sets ``func=run``)."""
    p = subparsers.add_parser("export", help="export a checkpoint to ONNX / TensorRT / TorchScript",
                              description=__doc__.split("\n\n")[0].replace("``", ""))
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _spatial(values, default: int, spatial_dims: int, name: str) -> tuple[int, ...]:
    values = [default] if values is None else list(values)
    if len(values) == 1:
        values *= spatial_dims
    if len(values) != spatial_dims:
        raise ValueError(f"--{name} needs 1 or {spatial_dims} ints for this {spatial_dims}D model, got {values}")
    return tuple(values)


def run(args: argparse.Namespace) -> int:
    """Export as asked; returns the exit status (module doc)."""
    import torch

    from ..models.io import load_model
    from .onnx import example_input, export_onnx, onnx_parity
    from .tensorrt import build_tensorrt_engine
    from .torchscript import export_torchscript

    output = Path(args.output)
    try:
        model, _ = load_model(args.model)
        if args.format == "torchscript":
            export_torchscript(model, output, fuse=args.fuse)
            print(f"wrote {output}")
            return 0
        onnx_path = output if args.format == "onnx" else output.with_name(output.name + ".onnx")
        export_onnx(model, onnx_path, opset=args.opset, fuse=args.fuse)
        diff = onnx_parity(model, onnx_path, example_input(model, batch=2))
        print(f"wrote {onnx_path} (onnx.checker ok; max |ONNX Runtime - PyTorch| logit difference {diff:.3g})")
        if diff > args.atol:
            print(f"error: ONNX Runtime differs from PyTorch by {diff:.3g} > --atol {args.atol}", file=sys.stderr)
            return 1
        if args.format == "tensorrt":
            d, c = model.spatial_dims, model.in_channels
            window = _spatial(args.window, 128 if d == 3 else 512, d, "window")
            low = _spatial(args.min_window, model.size_multiple, d, "min-window")
            build_tensorrt_engine(onnx_path, output, min_shape=(1, c) + low, opt_shape=(args.batch, c) + window,
                                  max_shape=(args.batch, c) + window, precision=args.precision,
                                  workspace_gib=args.workspace_gib)
            print(f"wrote {output} (TensorRT {args.precision}, profile min {low} max {window}, batch <= {args.batch})")
        return 0
    except (ValueError, ImportError, OSError, TypeError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m hmedn_fast.export.cli ARGS``."""
    parser = argparse.ArgumentParser(prog="hmedn export", description=__doc__.split("\n\n")[0].replace("``", ""))
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
