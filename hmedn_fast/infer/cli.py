"""``hmedn infer``: segment NIfTI / PNG files with a trained checkpoint.

    hmedn infer --model CKPT --input PATH [PATH ...] --output DIR [--roi 128 128 128] [--overlap 0.5]
                [--sw-batch 4] [--tta] [--no-postprocess] [--engine eager|compiled|onnx|tensorrt] ...

Inputs are files or folders (every ``.nii``, ``.nii.gz`` and ``.png`` in them, hidden files skipped). Each
image is normalised as the checkpoint's ``record["intensity"]`` says (:func:`hmedn_fast.infer.io.normalize`;
per-channel z-score by default), segmented (:func:`hmedn_fast.infer.segment`) and written to DIR under its
own file name, NIfTI with the input's affine and header. No resampling is done: images are expected at
the training resolution. A file that cannot be read or segmented prints ``error: PATH: reason`` and the
other files go on; the exit status is then 1 (2 when the checkpoint or the options are unusable).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..device import resolve_device
from .io import SUFFIXES, normalize, read_image, write_labels

ENGINES = ("eager", "compiled", "onnx", "tensorrt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_ROI_3D = 128


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``hmedn infer`` (module doc)."""
    p.add_argument("--model", required=True, help="checkpoint written by hmedn_fast.models.io.save_model / training")
    p.add_argument("--input", required=True, nargs="+", help="image files (.nii, .nii.gz, .png) or folders of them")
    p.add_argument("--output", required=True, help="folder for the label maps")
    p.add_argument("--roi", type=int, nargs="+", default=None,
                   help="sliding-window size (one int or one per axis); default: the checkpoint's 'patch_size', "
                        f"else {DEFAULT_ROI_3D}^3 for 3D models and the whole image for 2D models")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap fraction in [0, 1)")
    p.add_argument("--sw-batch", type=int, default=4, help="windows per network call")
    p.add_argument("--tta", action="store_true", help="average over flips of every spatial axis")
    p.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=True,
                   help="anatomically-constrained merging of the label map (default: on)")
    p.add_argument("--min-size", type=int, default=64, help="smallest isolated component kept by --postprocess")
    p.add_argument("--engine", choices=ENGINES, default="eager",
                   help="eager PyTorch, compiled (torch.compile + CUDA graph, fixed --roi), ONNX Runtime, TensorRT")
    p.add_argument("--engine-file", default=None,
                   help="ONNX file for --engine onnx (exported on the fly when absent) or TensorRT engine for "
                        "--engine tensorrt (required)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (eager / compiled)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--accumulate-device", default=None, help="device of the probability accumulators (e.g. cpu)")
    p.add_argument("--slice-axis", type=int, default=2, help="axis a 2D model slices 3D volumes along")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``infer`` on an ``argparse`` subparsers object (sets ``func=run``)."""
    p = subparsers.add_parser("infer", help="segment NIfTI / PNG images with a trained checkpoint",
                              description=__doc__.split("\n\n")[0].replace("``", ""))
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def expand_inputs(paths: Sequence[str]) -> list[Path]:
    """Files given, plus the supported image files of folders given (sorted, hidden ones skipped)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir()
                            if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(SUFFIXES))
        else:
            files.append(p)
    return files


def _roi(args: argparse.Namespace, record: dict, spatial_dims: int):
    roi = args.roi if args.roi is not None else record.get("patch_size")
    if roi is None:
        return DEFAULT_ROI_3D if spatial_dims == 3 else None
    roi = [int(r) for r in ([roi] if isinstance(roi, int) else roi)]
    if len(roi) == 1:
        roi *= spatial_dims
    if len(roi) != spatial_dims or min(roi) < 1:
        raise ValueError(f"--roi needs 1 or {spatial_dims} positive ints for this {spatial_dims}D model, got {roi}")
    return tuple(roi)


def make_engine(args: argparse.Namespace, model, roi, workdir: Path):
    """The engine ``--engine`` asks for (ValueError when its options are missing)."""
    from . import engines

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    if args.engine == "eager":
        return engines.EagerEngine(model, device, dtype)
    if args.engine == "compiled":
        if roi is None:
            raise ValueError("--engine compiled runs a fixed window: give --roi")
        window = (roi,) * model.spatial_dims if isinstance(roi, int) else roi
        return engines.CompiledEngine(model, window, args.sw_batch, device, dtype, cuda_graph=device.type == "cuda")
    if args.engine == "onnx":
        path = args.engine_file
        if path is None:
            from ..export.onnx import export_onnx

            path = export_onnx(model, workdir / "model.onnx")
        return engines.OnnxRuntimeEngine(path)
    if args.engine_file is None:
        raise ValueError("--engine tensorrt needs --engine-file (build one with: hmedn export --format tensorrt)")
    return engines.TensorRTEngine(args.engine_file, device)


def run(args: argparse.Namespace) -> int:
    """Segment every input; returns the exit status (0 ok, 1 some files failed, 2 unusable setup)."""
    from tqdm.auto import tqdm

    from ..models.io import load_model
    from .sliding_window import segment

    files = expand_inputs(args.input)
    with tempfile.TemporaryDirectory(prefix="hmedn_infer_") as workdir:
        try:
            if not files:
                raise ValueError(f"no image files found in {args.input}")
            model, record = load_model(args.model)
            roi = _roi(args, record, model.spatial_dims)
            engine = make_engine(args, model, roi, Path(workdir))
        except (ValueError, ImportError, OSError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        failed = 0
        for path in tqdm(files, desc="infer", unit="file"):
            try:
                if not path.is_file():
                    raise ValueError("no such file")
                image = read_image(path)
                data = normalize(image.data, record.get("intensity"))
                labels = segment(data, engine, roi_size=roi, overlap=args.overlap, sw_batch_size=args.sw_batch,
                                 flips=args.tta or None, postprocess=args.postprocess, min_size=args.min_size,
                                 slice_axis=args.slice_axis, accumulate_device=args.accumulate_device)
                write_labels(labels, image, args.output)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                failed += 1
                tqdm.write(f"error: {path}: {exc}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m hmedn_fast.infer.cli ARGS``."""
    parser = argparse.ArgumentParser(prog="hmedn infer", description=__doc__.split("\n\n")[0].replace("``", ""))
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
