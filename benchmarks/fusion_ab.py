"""Same-process A/B on the GPU of the lean dense block's norm + ReLU in the Triton convolutions' prologue
(``hmedn_fast.nn.dense_lean.FUSED_FORWARD`` / ``FUSED_WGRAD``): hmedn_3d_l2 1x4x128^3, bf16 autocast, channels-last,
CUDA graph, at the ``lean`` and ``stages`` levels (``gpu_train.py``'s ``lean_graph`` / ``lean_stages_graph``), each
combination of the two switches; MONAI DynUNet bf16 + graph before and after; then a kernel profile of the (eager) lean step
with and without the fusion.

    python benchmarks/fusion_ab.py --out DIR

Every hmedn setting runs twice and the second run is the one to read (a graphed setting's first run in a process
times kernels for new shapes, which its peak includes). Writes DIR/train_fusion_prologue_ab_<card>.json after every
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

SWITCHES = ((True, True), (False, False), (True, False), (False, True))  # (forward, weight gradient); first: default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fusion_ab.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    rows = [("dynunet_bf16_graph", None)]
    rows += [(config, s) for config in ("lean_graph", "lean_stages_graph") for s in SWITCHES]
    rows += [("dynunet_bf16_graph", None)]
    record = {**environment(), "what": __doc__, "rows": [], "profile_lean": {}}
    path = args.out / f"train_fusion_prologue_ab_{card_slug(torch.cuda.get_device_name())}.json"
    t0 = time.time()
    for config, switches in rows:
        fwd, wgrad = switches or (True, True)
        dense_lean.FUSED_FORWARD, dense_lean.FUSED_WGRAD = fwd, wgrad
        for rep in (0, 1) if switches else (0,):
            r = gpu_train.time_steps(config, 128, 4, args.iters)
            record["rows"].append({"config": config, "fused_forward": switches and fwd,
                                   "fused_wgrad": switches and wgrad, "rep": rep, **r})
            path.write_text(json.dumps(record, indent=1))
            print(f"{config:20s} fused fwd={fwd!s:5} wgrad={wgrad!s:5} rep={rep}: {r['p50_ms']:6.1f} ms "
                  f"{r['peak_mib']:7.0f} MiB  first {r['first_step_s']:.0f} s  [{time.time() - t0:.0f} s]", flush=True)
    for fused in (True, False):
        dense_lean.FUSED_FORWARD = dense_lean.FUSED_WGRAD = fused
        prof = gpu_train.profile_step("lean", 128, top=25)
        record["profile_lean"]["fused" if fused else "unfused"] = prof
        path.write_text(json.dumps(record, indent=1))
        print(f"profile lean (eager) fused={fused}: {prof['gpu_ms']:.1f} ms GPU")
        for k in prof["kernels"][:12]:
            print(f"   {k['ms']:7.3f} ms {k['calls']:4d}  {k['name'][:90]}")
    dense_lean.FUSED_FORWARD = dense_lean.FUSED_WGRAD = True
    print("wrote", path)


if __name__ == "__main__":
    main()
