"""Same-process A/B of the ``stages`` level's memory cuts on the GPU: hmedn_3d_l2 1x4x128^3, bf16 autocast,
channels-last, CUDA graph (``gpu_train.py``'s ``lean_stages_graph``), with each cut switched back in turn: the
dense backward's channel groups (``memory.STAGES_GROUP_CHANNELS``), the number of recomputed encoder stages
(``memory.STAGES_RECOMPUTED``) and the HR pathway's recomputation (``DistillingPathway.recompute_hr``); ``lean`` +
graph and MONAI DynUNet bf16 (+ graph, and its plain eager step last) in the same process.

    python benchmarks/stages_ab.py --out DIR [--variants 32,2,1 32,0,1 ...]

``--variants`` replaces the default list: each ``groups,stages,hr[,parked[,park_hr]]``: group channels of the decoder's
full-resolution dense block, or ``D/E`` for the decoder's and the encoder's (``none``: whole layers;
``memory.STAGES_GROUP_CHANNELS`` / ``STAGES_ENCODER_GROUP_CHANNELS``), recomputed encoder stages, HR pathway
recomputed 1/0, encoder stages parked in host memory instead (``memory.STAGES_PARKED``, default 0), HR pathway
parked instead 1/0 (``memory.STAGES_PARK_HR``, default 0). ``--flat-conv-tiles`` runs the Triton convolutions with
their flat tiles (no boxes; compare two processes of one call).

Each stages variant runs twice and the second run is the one to read: a graphed setting's peak includes its first
steps, which time kernels for shapes new in the process (DynUNet's first run likewise: cuDNN's search). Writes
DIR/train_stages_ab_<card>.json after every row.
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
from hmedn_fast.nn.pathways import DistillingPathway  # noqa: E402
from hmedn_fast.ops.triton import conv_wgrad  # noqa: E402
from hmedn_fast.train import memory  # noqa: E402

VARIANTS = (((32, 32), 2, True, 1, False), ((48, 48), 2, True, 1, False), ((48, None), 2, True, 2, True),
            ((32, None), 2, True, 2, True), ((None, None), 2, True, 1, False))
# ((decoder, encoder group channels), recomputed stages, HR recomputed, stages parked, HR parked)


def variant(text: str) -> tuple[tuple[int | None, int | None], int, bool, int, bool]:
    """``"32,2,1"`` -> ((32, 32), 2, True, 0, False); ``"48/none,2,1,2,1"`` -> ((48, None), 2, True, 2, True)."""
    groups, stages, hr, *park = text.split(",")
    dec, enc = ([None if g == "none" else int(g) for g in groups.split("/")] * 2)[:2]
    return (dec, enc), int(stages), hr == "1", int(park[0]) if park else 0, park[1:] == ["1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--variants", nargs="+", type=variant, default=list(VARIANTS))
    parser.add_argument("--tag", default="", help="suffix of the record's name")
    parser.add_argument("--flat-conv-tiles", action="store_true",
                        help="the Triton convolutions' flat tiles everywhere (hmedn_fast.ops.triton.conv_wgrad.BOX_TILES off)")
    args = parser.parse_args()
    conv_wgrad.BOX_TILES = not args.flat_conv_tiles
    if not torch.cuda.is_available():
        sys.exit("stages_ab.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    set_checkpointing, recompute_hr = gpu_train.set_checkpointing, [True]

    def patched(model: torch.nn.Module, level: str) -> None:
        set_checkpointing(model, level)
        for m in model.modules():
            if isinstance(m, DistillingPathway) and level == "stages":
                m.recompute_hr = recompute_hr[0]

    gpu_train.set_checkpointing = patched
    other = (None,) * 5
    rows = [("dynunet_bf16_graph", *other)]
    rows += [("lean_stages_graph", *v) for v in args.variants]
    rows += [("lean_graph", *other), ("dynunet_bf16_graph", *other), ("dynunet_bf16", *other)]
    record = {**environment(), "what": __doc__, "box_conv_tiles": conv_wgrad.BOX_TILES, "rows": []}
    path = args.out / f"train_stages_ab_{card_slug(torch.cuda.get_device_name())}{args.tag}.json"
    t0 = time.time()
    for config, groups, stages, hr, parked, park_hr in rows:
        memory.STAGES_GROUP_CHANNELS, memory.STAGES_ENCODER_GROUP_CHANNELS = groups or (None, None)
        memory.STAGES_RECOMPUTED = 2 if stages is None else stages
        memory.STAGES_PARKED, memory.STAGES_PARK_HR = parked or 0, bool(park_hr)
        recompute_hr[0] = True if hr is None else hr
        for rep in (0, 1) if config == "lean_stages_graph" else (0,):
            r = gpu_train.time_steps(config, 128, 4, 10)
            record["rows"].append({"config": config, "group_channels": groups, "recompute_stages": stages,
                                   "recompute_hr": hr, "parked_stages": parked, "park_hr": park_hr, "rep": rep, **r})
            path.write_text(json.dumps(record, indent=1))
            print(f"{config:18s} groups={groups} recompute={stages},{hr} park={parked},{park_hr} rep={rep}: "
                  f"{r['p50_ms']:6.1f} ms {r['peak_mib']:7.0f} MiB  first {r['first_step_s']:.0f} s  "
                  f"[{time.time() - t0:.0f} s]", flush=True)
    print("wrote", path)


if __name__ == "__main__":
    main()
