"""Same-process A/B on the GPU of the lean dense block's convolutions writing straight into the block's buffer (the
Triton forward's ``out=``) against the earlier copy of each layer's output into it: hmedn_3d_l2 1x4x128^3, bf16
autocast, channels-last, CUDA graph, at the ``lean`` and ``stages`` levels (``gpu_train.py``'s ``lean_graph`` /
``lean_stages_graph``), MONAI DynUNet bf16 + graph before and after.

    python benchmarks/buffer_write_ab.py --out DIR

The copy variant patches ``hmedn_fast.nn.dense_lean._conv`` to convolve into a tensor of its own and copy it into the
buffer slice. Every hmedn setting runs twice; read the second run (a graphed setting's first run in a process
times kernels for new shapes, which its peak includes). Writes DIR/train_buffer_write_ab_<card>.json after every
row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_train  # noqa: E402
from record import card_slug, environment  # noqa: E402
from hmedn_fast.nn import dense_lean  # noqa: E402
from hmedn_fast.ops.copy import copy_channels_  # noqa: E402

DIRECT = dense_lean._conv


def copied(x: torch.Tensor, weight: torch.Tensor, conv: torch.nn.Module, out: torch.Tensor | None = None):
    """The earlier forward: the convolution into a tensor of its own, then copied into the buffer slice."""
    y = DIRECT(x, weight, conv)
    return y if out is None else copy_channels_(out, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("buffer_write_ab.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    rows = [("dynunet_bf16_graph", None)]
    rows += [(config, direct) for config in ("lean_graph", "lean_stages_graph") for direct in (True, False)]
    rows += [("dynunet_bf16_graph", None)]
    record = {**environment(), "what": __doc__, "rows": []}
    path = args.out / f"train_buffer_write_ab_{card_slug(torch.cuda.get_device_name())}.json"
    t0 = time.time()
    for config, direct in rows:
        dense_lean._conv = DIRECT if direct in (True, None) else copied
        for rep in (0, 1) if direct is not None else (0,):
            r = gpu_train.time_steps(config, 128, 4, 10)
            record["rows"].append({"config": config, "direct_write": direct, "rep": rep, **r})
            path.write_text(json.dumps(record, indent=1))
            print(f"{config:20s} direct={direct!s:5} rep={rep}: {r['p50_ms']:6.1f} ms {r['peak_mib']:7.0f} MiB  "
                  f"first {r['first_step_s']:.0f} s  [{time.time() - t0:.0f} s]", flush=True)
    dense_lean._conv = DIRECT
    print("wrote", path)


if __name__ == "__main__":
    main()
