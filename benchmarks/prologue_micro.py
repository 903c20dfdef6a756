"""Per-shape GPU times of the Triton convolutions with and without the norm + ReLU prologue, on hmedn_3d_l2's
full-resolution dense-layer shapes (C_in -> 16 channels at 128^3, bf16, the input a channel slice of a 96-channel
channels-last buffer): forward and weight gradient on a contiguous input, on the buffer slice, on the slice with the
prologue; cuDNN on the contiguous input; and the norm + ReLU pass the prologue replaces (Triton apply of the slice).

    python benchmarks/prologue_micro.py --out DIR       (writes DIR/conv_prologue_<card>.json)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import card_slug, environment  # noqa: E402
from timing import cuda_times  # noqa: E402
from hmedn_fast.ops.triton import conv_fwd, conv_wgrad, norm  # noqa: E402

CL = torch.channels_last_3d


def ms(fn) -> float:
    return float(np.median(cuda_times(fn, 20, warmup=3)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    s, total = args.size, 96
    buf = torch.randn(1, total, s, s, s, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)
    rows = []
    for c_in in (16, 32, 48, 64, 80):
        x = buf[:, :c_in]
        dense = x.contiguous(memory_format=CL)
        w = (torch.randn(16, c_in, 3, 3, 3, device="cuda") / (27 * c_in) ** 0.5).bfloat16()
        gy = torch.randn(1, 16, s, s, s, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL)
        xf, xs = norm.flat(x)
        geo = norm.geometry(tuple(x.shape), xs, None, "batch", 1, True)
        coef = norm.statistics(geo, xf, None, None, None, None, 1e-5, 0.1, True, False)
        out = buf[:, 80:96]
        r = {"c_in": c_in, "size": s,
             "fwd_dense": ms(lambda: conv_fwd.conv3x3_forward(dense, w, 1)),
             "fwd_slice": ms(lambda: conv_fwd.conv3x3_forward(x, w, 1)),
             "fwd_slice_out": ms(lambda: conv_fwd.conv3x3_forward(x, w, 1, out=out)),
             "fwd_slice_prologue": ms(lambda: conv_fwd.conv3x3_forward(x, w, 1, prologue=coef, out=out)),
             "fwd_cudnn": ms(lambda: F.conv3d(dense, w, padding=1)),
             "norm_apply": ms(lambda: norm.apply(geo, xf, None, coef, True)),
             "wgrad_dense": ms(lambda: conv_wgrad.conv3x3_wgrad(gy, dense, 1)),
             "wgrad_slice": ms(lambda: conv_wgrad.conv3x3_wgrad(gy, x, 1)),
             "wgrad_slice_prologue": ms(lambda: conv_wgrad.conv3x3_wgrad(gy, x, 1, prologue=coef)),
             "wgrad_cudnn": ms(lambda: torch.ops.aten.convolution_backward(
                 gy, dense, w, None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1, [False, True, False]))}
        rows.append(r)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"conv_prologue_{card_slug(torch.cuda.get_device_name())}.json"
    path.write_text(json.dumps({**environment(), "what": __doc__, "rows": rows}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
