"""The tensor-core halo-tile convolution (``hmedn_fast.ops.conv_mma``, kernels/conv3x3.cu) against the Triton kernels
and cuDNN (``cudnn.benchmark``) on the HR pathway's 3x3x3 convolution, 32 -> 32 channels, bf16 channels-last,
forward, input gradient and weight gradient, in one process: GPU time per call from CUDA-graph replays, TFLOP/s, and
the error of each against float32 ``F.conv3d`` (and its gradients) of the same bf16 values (max abs difference / max
abs value).

    python benchmarks/conv_mma.py --out DIR [--side 64] [--dilations 1,2,4]

Writes DIR/conv_mma_<card>.json and prints one line per case.
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

from hmedn_fast.ops import conv_mma  # noqa: E402
from hmedn_fast.ops.triton import conv_fwd, conv_wgrad  # noqa: E402

CL = torch.channels_last_3d


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def case(side: int, d: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(d)
    x = torch.randn(1, 32, side, side, side, device="cuda", generator=g).bfloat16().contiguous(memory_format=CL)
    w = (torch.randn(32, 32, 3, 3, 3, device="cuda", generator=g) / (27 * 32) ** 0.5).bfloat16()
    ref_fwd = F.conv3d(x.float(), w.float(), padding=d, dilation=d)
    ref_dgrad = F.conv_transpose3d(x.float(), w.float(), padding=d, dilation=d)  # x as the output gradient
    gy = torch.randn(x.shape, device="cuda", generator=g).bfloat16().contiguous(memory_format=CL)
    wf = torch.zeros(32, 32, 3, 3, 3, device="cuda", requires_grad=True)
    F.conv3d(x.float(), wf, padding=d, dilation=d).backward(gy.float())
    ref_wgrad = wf.grad

    def cudnn_wgrad():
        return torch.ops.aten.convolution_backward(gy, x, w, None, [1] * 3, [d] * 3, [d] * 3, False, [0] * 3, 1,
                                                   [False, True, False])[1]
    poison = torch.full_like(x, float("nan"))
    mma_fwd = conv_mma.conv3x3_forward(x, w, d, out=poison.clone())
    mma_dgrad = conv_mma.conv3x3_input_grad(x, w, d)
    runs = {
        "fwd": {"cudnn": lambda: F.conv3d(x, w, padding=d, dilation=d),
                "triton": lambda: conv_fwd.conv3x3_forward(x, w, d),
                "mma": lambda: conv_mma.conv3x3_forward(x, w, d)},
        "dgrad": {"cudnn": lambda: F.conv_transpose3d(x, w, padding=d, dilation=d),
                  "triton": lambda: conv_fwd.conv3x3_input_grad(x, w, d),
                  "mma": lambda: conv_mma.conv3x3_input_grad(x, w, d)},
        "wgrad": {"cudnn": cudnn_wgrad, "triton": lambda: conv_wgrad.conv3x3_wgrad(gy, x, d),
                  "mma": lambda: conv_mma.conv3x3_wgrad(gy, x, d)},
    }
    gflop = 2 * x.numel() * 27 * 32 / 1e9
    out = {"side": side, "dilation": d, "gflop": gflop, "all_written": bool(torch.isfinite(mma_fwd).all()),
           "err": {"fwd": {"mma": _rel_err(mma_fwd, ref_fwd), "cudnn": _rel_err(runs["fwd"]["cudnn"](), ref_fwd),
                           "triton": _rel_err(runs["fwd"]["triton"](), ref_fwd)},
                   "dgrad": {"mma": _rel_err(mma_dgrad, ref_dgrad),
                             "cudnn": _rel_err(runs["dgrad"]["cudnn"](), ref_dgrad),
                             "triton": _rel_err(runs["dgrad"]["triton"](), ref_dgrad)},
                   "wgrad": {k: _rel_err(f(), ref_wgrad) for k, f in runs["wgrad"].items()}},
           "ms": {p: {k: graph_ms(f) for k, f in fns.items()} for p, fns in runs.items()}}
    out["tflops"] = {p: {k: gflop / ms for k, ms in t.items()} for p, t in out["ms"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--dilations", default="1,2,4")
    ap.add_argument("--tag", default="", help="suffix of the record file name")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    rows = [case(args.side, int(d)) for d in args.dilations.split(",")]
    for r in rows:
        for p in ("fwd", "dgrad", "wgrad"):
            ms, err = r["ms"][p], r["err"][p]
            print(f"d={r['dilation']} {p:5s} " + "  ".join(
                f"{k} {ms[k] * 1e3:6.1f} us ({r['gflop'] / ms[k]:5.0f} TFLOP/s, err {err[k]:.1e})" for k in ms))
    path = Path(args.out) / f"conv_mma_{card_slug(torch.cuda.get_device_name())}{args.tag}.json"
    path.write_text(json.dumps({**environment(), "what": __doc__.split("\n\n")[0], "rows": rows}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
