"""Host <-> GPU copy bandwidth of pinned memory, alone and under a running training-like workload: what offloading
saved activations to the host (instead of recomputing them at the ``stages`` level) could move per millisecond.

    python benchmarks/host_link.py --out DIR          (writes DIR/host_link_<card>.json)

Rows: device-to-host and host-to-device copies of 64-1024 MiB into / from pinned memory on a side stream (CUDA
events); then the same 512 MiB copies issued on a side stream while the default stream runs bf16 3x3x3
convolutions (64 -> 64 channels at 64^3, channels-last) for the copy's duration, with the convolutions' time alone and
with the copy beside them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import card_slug, environment  # noqa: E402


def timed(stream: torch.cuda.Stream, fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record()
        fn()
        end.record()
    end.synchronize()
    return start.elapsed_time(end)


def copier(direction: str, dev: torch.Tensor, host: torch.Tensor):
    """A call copying dev into the pinned host tensor ("d2h") or back ("h2d"), asynchronously."""
    if direction == "d2h":
        return lambda: host.copy_(dev, non_blocking=True)
    return lambda: dev.copy_(host, non_blocking=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    side = torch.cuda.Stream()
    main_stream = torch.cuda.current_stream()
    rows = []
    for mib in (64, 256, 512, 1024):
        dev = torch.randn(mib * 2**18, device="cuda")
        host = torch.empty(dev.shape, pin_memory=True)
        for direction in ("d2h", "h2d"):
            copy = copier(direction, dev, host)
            timed(side, copy)
            ms = min(timed(side, copy) for _ in range(5))
            rows.append({"mib": mib, "direction": direction, "ms": ms, "gb_s": mib * 2**20 / ms / 1e6})
            print(f"{direction} {mib:5d} MiB: {ms:7.2f} ms {rows[-1]['gb_s']:6.1f} GB/s", flush=True)
    x = torch.randn(1, 64, 64, 64, 64, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(64, 64, 3, 3, 3, device="cuda", dtype=torch.bfloat16)
    torch.backends.cudnn.benchmark = True
    conv_ms = timed(main_stream, lambda: F.conv3d(x, w, padding=1))
    conv_ms = min(timed(main_stream, lambda: F.conv3d(x, w, padding=1)) for _ in range(5))
    dev = torch.randn(512 * 2**18, device="cuda")
    host = torch.empty(dev.shape, pin_memory=True)
    overlap = {}
    for direction in ("d2h", "h2d"):
        copy = copier(direction, dev, host)
        alone = min(timed(side, copy) for _ in range(3))
        n = max(1, int(alone / conv_ms) + 1)
        torch.cuda.synchronize()
        c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        m0, m1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            c0.record()
            copy()
            c1.record()
        m0.record()
        for _ in range(n):
            F.conv3d(x, w, padding=1)
        m1.record()
        torch.cuda.synchronize()
        overlap[direction] = {"copy_alone_ms": alone, "copy_beside_convs_ms": c0.elapsed_time(c1),
                              "convs": n, "convs_alone_ms": n * conv_ms, "convs_beside_copy_ms": m0.elapsed_time(m1)}
        print(direction, overlap[direction], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"host_link_{card_slug(torch.cuda.get_device_name())}.json"
    path.write_text(json.dumps({**environment(), "what": __doc__, "copies": rows, "overlap": overlap}, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
