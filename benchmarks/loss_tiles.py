"""Sweep of the fused loss kernel's launch shape on the GPU: logit voxels per tile (BLOCK) x warps x programs per
multiprocessor (each program loops over tiles; 0 = one program per tile), for the
one-pass forward (loss + gradients, the kernel of a training step) at 2x4x128^3 with weight map and contour term,
fp32 / bf16 logits, uint8 / int64 labels. GPU time per call from CUDA-graph replays (``tests/_gpu_time.graph_ms``),
next to the floor (inputs read once + gradients written once at the copy bandwidth measured in the same run);
every configuration's gradients must equal the default configuration's exactly (per-voxel arithmetic does not
depend on the launch shape) and its loss within 1e-6 relative (only the reduction's grouping changes).

    python benchmarks/loss_tiles.py --out DIR [--blocks 512,1024,2048] [--warps 4,8,16] [--programs 0,2,4,8]

Writes DIR/loss_tiles_<card>.json and prints one line per case and configuration.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_time import graph_ms  # noqa: E402
from gpu_loss import LOGIT_DTYPES, LABEL_DTYPES, copy_bandwidth, floor_bytes, make_case  # noqa: E402
from record import card_slug, environment  # noqa: E402

from hmedn_fast.ops.triton import loss as fused  # noqa: E402

SHAPE = (2, 4, 128, 128, 128)


def forward(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-pass forward: ``[L, L_s, L_r, divisor]`` and the gradients of L."""
    return fused._forward(case["logits"], case["labels"], case["weight"], case["contour_logits"],
                          case["contour_target"], None, 1.0, None, "mean", True, False)


def run(out_dir: Path, blocks: list[int], warps: list[int], programs: list[int]) -> dict:
    bw = copy_bandwidth()
    report = {**environment(), "copy_bandwidth_GBps": bw / 1e9, "shape": list(SHAPE),
              "default": {"block": fused.BLOCK, "num_warps": fused.NUM_WARPS,
                          "programs_per_sm": fused.PROGRAMS_PER_SM}, "cases": []}
    print(f"{report['card']}  torch {report['torch']}  triton {report['triton']}  copy {bw / 1e9:.0f} GB/s")
    defaults = fused.BLOCK, fused.NUM_WARPS, fused.PROGRAMS_PER_SM, fused._block
    for dname, dtype in LOGIT_DTYPES.items():
        for lname, ldtype in LABEL_DTYPES.items():
            case = make_case(SHAPE, dtype, ldtype)
            floor_us = sum(floor_bytes(case)) / bw * 1e6
            ref = forward(case)
            entry = {"logits": dname, "labels": lname, "floor_us": floor_us, "rows": []}
            for block, nw, per_sm in itertools.product(blocks, warps, programs):
                fused.BLOCK, fused.NUM_WARPS, fused.PROGRAMS_PER_SM = block, nw, per_sm or 2**20
                fused._block = lambda children, k, b=block: b
                row = {"block": block, "num_warps": nw, "programs_per_sm": per_sm}
                try:
                    got = forward(case)
                    same = bool(torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]))
                    loss_rel = float((got[0][0] - ref[0][0]).abs() / ref[0][0].abs())
                    us = graph_ms(lambda: forward(case)) * 1e3
                    row.update(us=us, x_floor=us / floor_us, grads_equal=same, loss_rel=loss_rel)
                    print(f"{dname} {lname} block {block:5d} warps {nw:2d} programs/SM {per_sm:2d}: {us:7.1f} us = "
                          f"{us / floor_us:.2f}x floor {floor_us:.1f}; grads equal {same}, loss rel {loss_rel:.1e}")
                except Exception as err:  # e.g. out of registers / shared memory for a large block
                    row["error"] = repr(err)[:200]
                    print(f"{dname} {lname} block {block:5d} warps {nw:2d} programs/SM {per_sm:2d}: {row['error']}")
                finally:
                    fused.BLOCK, fused.NUM_WARPS, fused.PROGRAMS_PER_SM, fused._block = defaults
                entry["rows"].append(row)
            report["cases"].append(entry)
            del case, ref
            torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"loss_tiles_{card_slug(report['card'])}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--blocks", default="512,1024,2048,4096")
    parser.add_argument("--warps", default="4,8,16")
    parser.add_argument("--programs", default="0,2,4,8", help="programs per multiprocessor; 0: one per tile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("loss_tiles.py needs a CUDA GPU")
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    run(args.out, ints(args.blocks), ints(args.warps), ints(args.programs))


if __name__ == "__main__":
    main()
