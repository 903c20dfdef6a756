"""Sweep of the Triton 3x3x3 convolution kernel's tile shapes on the GPU: each program taking consecutive voxels of
the flattened volume (``launch_config``'s flat tiles) or a box of voxels (``conv3x3_forward(box=)``), for
the forward, the input gradient and the weight gradient (``conv3x3_wgrad(box=)``) of hmedn_3d_l2's shapes, against cuDNN (``cudnn.benchmark``) in the same
process. GPU time of one call from CUDA-graph replays (``tests/_gpu_time.graph_ms``); every result is checked
against cuDNN's (max abs difference relative to cuDNN's max abs value: bf16 rounding of either is ~4e-3).

    python benchmarks/conv_tiles.py --out DIR [--quick] [--boxes 128:8x8:4:3,256:16x4:8:2] [--shapes 0,2,5] [--tag T]

Writes DIR/conv_tiles_<card>.json and prints one line per shape (best box vs flat vs cuDNN).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _gpu_time import graph_ms  # noqa: E402
from record import card_slug, environment  # noqa: E402

from hmedn_fast.ops.triton.conv_fwd import conv3x3_forward, conv3x3_input_grad, launch_config  # noqa: E402
from hmedn_fast.ops.triton.conv_wgrad import conv3x3_wgrad  # noqa: E402
from hmedn_fast.ops.triton.conv_wgrad import launch_config as wgrad_launch_config  # noqa: E402

CL = torch.channels_last_3d
# (pass, C_in, C_out, cube side, dilation): the forward's and the input gradient's shapes of hmedn_3d_l2 (1 x 4 x
# 128^3): dense layers of growth 16 at 128^3, the HR pathway's dilated 32 -> 32 at 64^3. For the input gradient,
# C_out is the layer's output (the shifted operand), C_in the gradient's width.
SHAPES = [("fwd", 32, 32, 64, 2), ("fwd", 32, 32, 64, 4), ("fwd", 16, 16, 128, 1), ("fwd", 32, 16, 128, 1),
          ("fwd", 64, 16, 128, 1), ("dgrad", 32, 32, 64, 2), ("dgrad", 32, 16, 128, 1), ("dgrad", 64, 16, 128, 1),
          ("wgrad", 32, 32, 64, 2), ("wgrad", 16, 16, 128, 1), ("wgrad", 32, 16, 128, 1), ("wgrad", 64, 16, 128, 1)]
# (voxels per program, (bx, by), warps, stages)
BOXES = [(128, (8, 4), 4, 3), (128, (16, 4), 4, 3), (128, (8, 8), 4, 3), (256, (8, 8), 8, 3), (256, (16, 8), 8, 3),
         (128, (8, 4), 4, 2), (256, (8, 8), 4, 2), (64, (8, 4), 4, 3)]
# the weight gradient's (voxels per tile, (bx, by), warps, stages)
WGRAD_BOXES = [(32, (8, 4), 4, 3), (32, (4, 4), 4, 3), (64, (8, 8), 4, 3), (64, (8, 4), 4, 3), (128, (8, 8), 4, 2),
               (128, (16, 8), 4, 2), (32, (16, 2), 4, 3), (64, (16, 4), 4, 2)]


def _case(kind: str, c_in: int, c_out: int, side: int):
    """fwd: (input, weight); dgrad: (output gradient, weight); wgrad: (input, output gradient)."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def volume(c):
        return torch.randn(1, c, side, side, side, device="cuda", generator=g).bfloat16().contiguous(memory_format=CL)

    if kind == "wgrad":
        return volume(c_in), volume(c_out)
    w = (torch.randn(c_out, c_in, 3, 3, 3, device="cuda", generator=g) / (27 * c_in) ** 0.5).bfloat16()
    return volume(c_in if kind == "fwd" else c_out), w


def _cudnn(kind: str, a, b, d):
    if kind == "fwd":
        return lambda: F.conv3d(a, b, padding=d, dilation=d)
    if kind == "wgrad":
        w = torch.empty(b.shape[1], a.shape[1], 3, 3, 3, device="cuda", dtype=a.dtype)
        return lambda: torch.ops.aten.convolution_backward(b, a, w, None, [1] * 3, [d] * 3, [d] * 3, False, [0] * 3,
                                                           1, [False, True, False])[1]
    shape = (a.shape[0], b.shape[1], *a.shape[2:])
    return lambda: torch.nn.grad.conv3d_input(shape, b, a, padding=d, dilation=d)


def _ours(kind: str, a, b, d, **config):
    if kind == "wgrad":
        return lambda: conv3x3_wgrad(b, a, d, **config)
    fn = conv3x3_forward if kind == "fwd" else conv3x3_input_grad
    return lambda: fn(a, b, d, **config)


def _parse_box(text: str) -> tuple[int, tuple[int, int], int, int]:
    """'128:8x4:4:3' -> (128, (8, 4), 4, 3)."""
    voxels, box, warps, stages = text.split(":")
    bx, by = box.split("x")
    return int(voxels), (int(bx), int(by)), int(warps), int(stages)


def _summary(config: dict | None) -> str:
    return "-" if config is None else f"{config['name']} {config['ms']:.4f} (err {config['err']:.1e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="first 3 shapes and 3 boxes")
    ap.add_argument("--boxes", help="comma-separated voxels:BXxBY:warps:stages (default: the BOXES list)")
    ap.add_argument("--wgrad-boxes", help="as --boxes, for the weight gradient (voxels per tile)")
    ap.add_argument("--shapes", help="comma-separated indices into SHAPES (default: all)")
    ap.add_argument("--tag", default="", help="suffix of the record's file name")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    shapes, boxes_conv = (SHAPES[:3], BOXES[:3]) if args.quick else (SHAPES, BOXES)
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.boxes:
        boxes_conv = [_parse_box(b) for b in args.boxes.split(",")]
    boxes_wgrad = [_parse_box(b) for b in args.wgrad_boxes.split(",")] if args.wgrad_boxes else WGRAD_BOXES
    record = {**environment(), "what": __doc__, "rows": []}
    out = Path(args.out) / f"conv_tiles_{card_slug(torch.cuda.get_device_name())}{args.tag}.json"
    for kind, c_in, c_out, side, d in shapes:
        x, w = _case(kind, c_in, c_out, side)
        boxes = boxes_wgrad if kind == "wgrad" else boxes_conv
        cudnn = _cudnn(kind, x, w, d)
        want = cudnn()
        scale = want.abs().max().item()
        row = {"pass": kind, "c_in": c_in, "c_out": c_out, "side": side, "dilation": d,
               "gflop": 2 * 27 * c_in * c_out * side ** 3 / 1e9, "cudnn_ms": graph_ms(cudnn), "configs": []}
        # the launch configurations without a volume: the flat tiles
        flat_bm = (wgrad_launch_config(c_in, c_out) if kind == "wgrad"
                   else launch_config(c_in if kind == "fwd" else c_out))[0]
        candidates = [("flat", dict(block_voxels=flat_bm))] + [
            (f"box {b[1][0]}x{b[1][1]} bm{b[0]} w{b[2]} s{b[3]}",
             dict(block_voxels=b[0], box=b[1], num_warps=b[2], num_stages=b[3])) for b in boxes]
        for name, config in candidates:
            ours = _ours(kind, x, w, d, **config)
            try:
                err = (ours().float() - want.float()).abs().max().item() / scale
                ms = graph_ms(ours)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record it, go on
                row["configs"].append({"name": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            row["configs"].append({"name": name, "ms": ms, "err": err})
        record["rows"].append(row)
        ok = [c for c in row["configs"] if "ms" in c]
        best = min((c for c in ok if c["name"] != "flat"), key=lambda c: c["ms"], default=None)
        flat = next((c for c in ok if c["name"] == "flat"), None)
        print(f"{kind:5s} {c_in:3d}->{c_out:3d} {side}^3 d{d}: cudnn {row['cudnn_ms']:.4f} | {_summary(flat)} | best "
              f"{_summary(best)}", flush=True)
        out.write_text(json.dumps(record, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
