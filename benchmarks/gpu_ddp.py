"""DDP check (issue 7): ``hmedn train`` under torchrun on N GPUs (batch B per rank) against one GPU with batch N*B,
same seed and options, so both runs see the same samples in the same global steps; compares their loss curves.

    python benchmarks/gpu_ddp.py --out DIR [--nproc 2] [--device cuda|cpu] [--quick] [--timeout 300] [--train-args ARGS]

Runs, one after the other (never concurrently, so the wall times are clean):

(a) ``torchrun --standalone --nproc_per_node N -m hmedn_fast.train.cli ... --batch-size B`` (GPUs 0..N-1);
(b) ``python -m hmedn_fast.train.cli ... --batch-size N*B`` on GPU 0 alone.

CUDA: hmedn_3d_l2 as in the paper (BatchNorm, so the trainer makes it SyncBatchNorm under DDP; dropout off, as
dropout masks are drawn per rank) on the generated 3D phantom (8 cases of 64^3, whole-case 64^3 patches),
B = 2, 3 epochs x 10 steps, the trainer's GPU defaults (bf16 autocast, fused Triton loss, NCCL). bf16 rounding,
cuDNN's algorithm choice and NCCL's reduction order make the two curves differ slightly; the script reports by
how much. CPU (``--device cpu``, gloo): the tiny 2D configuration of tests/test_train.py (hmedn_2d, instance
norm: per-sample statistics) on a 32^3 phantom, B = 2, 3 epochs x 4 steps. ``--quick``: 2 epochs x 4 (CUDA) or
x 3 (CPU) steps. Deterministic where the trainer allows it: seed 0 for split, samples, augmentation and
initialisation; no cuDNN autotuning (torch's default). NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and
friends are forced in the children's environment).

Checks (exit status 1 when one fails, after writing everything): both curves have the same length, are finite
and fall (mean loss of the last third of the steps below that of the first third). Reported, not asserted: max /
mean absolute and relative loss difference per step, relative difference of the final weights, validation Dice,
wall time per run (process start to exit) and per-epoch training time from each run's log.json (run (a) goes
first, so run (b) may find Triton's compiled kernels in the on-disk cache: compare the later epochs' times).

Writes DIR/ddp_<card>.json (card, versions, date, commands, curves, differences, times), DIR/ddp_<card>.log (each
run's console output, steps.csv and log.csv, one run after the other) and DIR/ddp_<card>.png (the two curves and
their difference), and prints a table. ``<card>`` is torch.cuda.get_device_name() with spaces as ``_`` (``cpu`` on
the CPU). A run that fails or runs past ``--timeout`` seconds prints the tail of its output and exits nonzero.
The training folders (checkpoints) live in a temporary directory and are removed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmedn_fast.train.checkpoint import load_checkpoint  # noqa: E402
from record import card_slug, environment  # noqa: E402

# NVLink multicast off in every child (it can take a shared host's GPUs out of service)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
TINY_2D = dict(widths=(8, 16, 32, 32), growth_rates=8, num_layers=2, hr_stage=2, hr_channels=8, hr_blocks=2,
               dropout=0.0, norm="instance")
SETUPS = {  # device: (model, overrides, phantom cases, phantom size, batch per rank, epochs, steps, quick steps)
    "cuda": ("hmedn_3d_l2", {"dropout": 0.0}, 8, 64, 2, 3, 10, 4),
    "cpu": ("hmedn_2d", TINY_2D, 6, 32, 2, 3, 4, 3),
}


def card_name(device: str) -> str:
    """The card's name with spaces as ``_`` (``cpu`` for the CPU); other characters unsafe in a file name too."""
    if device == "cpu":
        return "cpu"
    return card_slug(torch.cuda.get_device_name(0))


def train_args(device: str, quick: bool) -> tuple[list[str], int, dict]:
    """Options shared by both runs, the batch per rank, and the setup as a dict for the JSON."""
    model, overrides, cases, size, batch, epochs, steps, quick_steps = SETUPS[device]
    if quick:
        epochs, steps = 2, quick_steps
    args = ["--data", "phantom", "--model", model, "--phantom-cases", str(cases), "--phantom-size", str(size),
            "--epochs", str(epochs), "--steps-per-epoch", str(steps), "--val-every", str(epochs), "--seed", "0",
            "--device", device, "--no-progress",
            # both runs step eagerly at one level (a DDP run cannot replay a CUDA graph; the one-GPU run would)
            "--no-cuda-graph", "--checkpointing", "none"]
    if device == "cpu":
        args += ["--threads", "1"]
    args += [x for k, v in overrides.items() for x in ("--set", f"{k}={v if isinstance(v, str) else repr(v)}")]
    setup = {"model": model, "overrides": overrides, "phantom_cases": cases, "phantom_size": size,
             "batch_per_rank": batch, "epochs": epochs, "steps_per_epoch": steps}
    return args, batch, setup


def run_logged(name: str, cmd: list[str], env: dict, log: Path, timeout: float) -> float:
    """Run ``cmd`` in its own process group with stdout+stderr into ``log``; returns the wall time in s. On a
    nonzero exit or past ``timeout`` (the whole group is killed) prints the log's tail and exits with status 1."""
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            problem = f"exit status {rc}" if rc != 0 else None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            problem = f"timed out after {timeout:.0f} s (process group killed)"
    wall = time.perf_counter() - start
    if problem:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        print(f"[{name}] FAILED: {problem}; last lines of {log}:\n{tail}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"[{name}] done in {wall:.1f} s", flush=True)
    return wall


def read_run(folder: Path) -> dict:
    """Loss and learning-rate curves (steps.csv), per-epoch training times and final validation (log.json)."""
    table = np.loadtxt(folder / "steps.csv", delimiter=",", skiprows=1, ndmin=2)
    history = json.loads((folder / "log.json").read_text())["history"]
    return {"global_step": table[:, 0].astype(int).tolist(), "loss": table[:, 3].tolist(), "lr": table[:, 4].tolist(),
            "epoch_train_s": [row["time_s"] for row in history],
            "val_dice_mean": history[-1].get("val_dice_mean")}


def falls(loss: np.ndarray) -> bool:
    """Mean of the last third of the steps below the mean of the first third."""
    k = max(len(loss) // 3, 1)
    return bool(np.mean(loss[-k:]) < np.mean(loss[:k]))


def weight_difference(a: Path, b: Path) -> dict:
    """Relative L2 difference of the final floating-point weights and buffers: over all of them, and the largest
    per tensor (with its name)."""
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    if sa.keys() != sb.keys():
        return {"error": f"state_dict keys differ: {sorted(set(sa) ^ set(sb))[:10]}"}
    num = den = 0.0
    worst = ("", 0.0)
    for name, ta in sa.items():
        if not ta.is_floating_point():
            continue
        ta, tb = ta.double(), sb[name].double()
        d, n = float((ta - tb).norm()), float(tb.norm())
        num, den = num + d * d, den + n * n
        rel = d / n if n > 0 else (0.0 if d == 0 else float("inf"))
        if rel > worst[1]:
            worst = (name, rel)
    return {"rel_l2_all": (num / den) ** 0.5 if den > 0 else None, "worst_tensor": worst[0],
            "worst_tensor_rel_l2": worst[1]}


def plot(steps: np.ndarray, ddp: np.ndarray, one: np.ndarray, labels: tuple[str, str], title: str, path: Path) -> None:
    """Two panels: both loss curves against the global step, and their difference (DDP - one process)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": (2, 1)})
    top.plot(steps, ddp, marker="o", ms=3, label=labels[0])
    top.plot(steps, one, marker="x", ms=4, ls="--", label=labels[1])
    top.set(ylabel="training loss", title=title)
    top.legend()
    bottom.plot(steps, ddp - one, marker="o", ms=3, color="C3")
    bottom.axhline(0.0, color="k", lw=0.5)
    bottom.set(xlabel="global step", ylabel="loss difference\n(DDP - one)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def versions(device: str) -> dict:
    out = environment(device)
    if device == "cuda":
        nccl = torch.cuda.nccl.version()  # a tuple in torch 2.x, an int in older releases
        out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        out["visible_gpus"] = torch.cuda.device_count()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for ddp_<card>.json/.log/.png")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the DDP run (default: 2)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: NCCL, one GPU per rank; cpu: gloo, tiny instance-norm model (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per run (default: 300)")
    parser.add_argument("--train-args", default="", metavar="'ARGS'",
                        help="more hmedn train options for both runs, later ones winning (e.g. \"--checkpointing lean "
                             "--no-sync-bn\": per-GPU BatchNorm, so the curves differ by more than rounding)")
    args = parser.parse_args()
    if args.nproc < 2:
        parser.error(f"--nproc must be >= 2 (a DDP run), got {args.nproc}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu_ddp.py --device cuda needs CUDA GPUs (use --device cpu for the gloo version)")
        if torch.cuda.device_count() < args.nproc:
            sys.exit(f"gpu_ddp.py --nproc {args.nproc} needs {args.nproc} GPUs, found {torch.cuda.device_count()}")
    args.out.mkdir(parents=True, exist_ok=True)
    card = card_name(args.device)
    common, batch, setup = train_args(args.device, args.quick)
    common += shlex.split(args.train_args)
    n = args.nproc
    threads = str(max((os.cpu_count() or 1) // n, 1)) if args.device == "cuda" else "1"
    env = {**os.environ, **NO_MULTICAST, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # respect a caller's restriction: use its first GPUs
    ids = visible.split(",") if visible else [str(i) for i in range(max(torch.cuda.device_count(), n))]
    gpus = {"ddp": ",".join(ids[:n]), "one": ids[0]}
    names = {"ddp": f"ddp_{n}x_batch{batch}", "one": f"one_batch{n * batch}"}
    labels = (f"DDP {n} {'GPUs' if args.device == 'cuda' else 'processes'} x batch {batch}",
              f"1 {'GPU' if args.device == 'cuda' else 'process'} x batch {n * batch}")

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_ddp_") as tmp:
        cmds = {"ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                        "--tee", "3", "-m", "hmedn_fast.train.cli", *common, "--batch-size", str(batch),
                        "--out", f"{tmp}/ddp"],
                "one": [sys.executable, "-m", "hmedn_fast.train.cli", *common, "--batch-size", str(n * batch),
                        "--out", f"{tmp}/one"]}
        for key in ("ddp", "one"):  # one after the other
            run_env = {**env, "CUDA_VISIBLE_DEVICES": gpus[key]} if args.device == "cuda" else env
            wall = run_logged(names[key], cmds[key], run_env, Path(tmp) / f"{key}.log", args.timeout)
            runs[key] = {"name": names[key], "label": labels[0 if key == "ddp" else 1], "wall_s": round(wall, 2),
                         "command": shlex.join(cmds[key]).replace(tmp, "$RUN"),
                         "env": {"CUDA_VISIBLE_DEVICES": gpus[key]} if args.device == "cuda" else {},
                         **read_run(Path(tmp) / key)}
        weights = weight_difference(Path(tmp) / "ddp" / "last.pt", Path(tmp) / "one" / "last.pt")
        with open(args.out / f"ddp_{card}.log", "w") as log:
            for key in ("ddp", "one"):
                log.write(f"===== run {runs[key]['name']}: {runs[key]['label']}\n")
                run_vars = {"OMP_NUM_THREADS": threads, **runs[key]["env"]}
                log.write(f"===== env: {' '.join(f'{k}={v}' for k, v in run_vars.items())}\n")
                log.write(f"===== command: {runs[key]['command']}\n")
                log.write((Path(tmp) / f"{key}.log").read_text(errors="replace"))
                for table in ("steps.csv", "log.csv"):
                    log.write(f"===== {runs[key]['name']} {table}\n{(Path(tmp) / key / table).read_text()}")
                log.write(f"===== end of {runs[key]['name']}: exit 0, wall {runs[key]['wall_s']} s\n\n")

    ddp, one = np.array(runs["ddp"]["loss"]), np.array(runs["one"]["loss"])
    checks = {"same_length": len(ddp) == len(one), "finite": bool(np.isfinite(ddp).all() and np.isfinite(one).all()),
              "ddp_falls": falls(ddp), "one_falls": falls(one)}
    diff: dict = {}
    if checks["same_length"]:
        absdiff = np.abs(ddp - one)
        rel = absdiff / np.abs(one)
        diff = {"abs_per_step": absdiff.tolist(), "rel_per_step": rel.tolist(), "max_abs": float(absdiff.max()),
                "max_rel": float(rel.max()), "mean_abs": float(absdiff.mean()), "mean_rel": float(rel.mean()),
                "lr_identical": runs["ddp"]["lr"] == runs["one"]["lr"]}
    steady = {k: (float(np.mean(runs[k]["epoch_train_s"][1:])) if len(runs[k]["epoch_train_s"]) > 1 else None)
              for k in runs}
    result = {**versions(args.device), "device": args.device, "nproc": n,
              "setup": {**setup, "global_batch": n * batch, "quick": args.quick, "train_args": args.train_args,
                        "omp_num_threads": int(threads), **NO_MULTICAST},
              "runs": runs, "loss_difference": diff, "final_weights_difference": weights,
              "steady_epoch_train_s": steady,
              "ddp_speedup_steady_epochs": (steady["one"] / steady["ddp"]) if steady["ddp"] and steady["one"] else None,
              "checks": checks, "ok": all(checks.values())}
    (args.out / f"ddp_{card}.json").write_text(json.dumps(result, indent=1))
    if checks["same_length"]:
        title = f"{setup['model']} on the phantom, {card}: global batch {n * batch}"
        plot(np.array(runs["one"]["global_step"]), ddp, one, labels, title, args.out / f"ddp_{card}.png")

    print(f"\n{'step':>5} {'loss DDP':>12} {'loss one':>12} {'abs diff':>10} {'rel diff':>10}")
    for i in range(min(len(ddp), len(one))):
        print(f"{runs['one']['global_step'][i]:5d} {ddp[i]:12.5f} {one[i]:12.5f} {abs(ddp[i] - one[i]):10.2e} "
              f"{abs(ddp[i] - one[i]) / abs(one[i]):10.2e}")
    for k in ("ddp", "one"):
        r = runs[k]
        print(f"{r['label']:28s} wall {r['wall_s']:7.1f} s  epochs {r['epoch_train_s']} s  "
              f"val Dice {r['val_dice_mean']}")
    if diff:
        print(f"loss difference: max abs {diff['max_abs']:.3e}, max rel {diff['max_rel']:.3e}, "
              f"mean rel {diff['mean_rel']:.3e}; lr identical: {diff['lr_identical']}")
    print(f"final weights: {weights}")
    print(f"checks: {checks}")
    print("wrote", *(args.out / f"ddp_{card}.{ext}" for ext in ("json", "log", "png")))
    if not result["ok"]:
        sys.exit(f"gpu_ddp.py: check failed: {[k for k, v in checks.items() if not v]}")


if __name__ == "__main__":
    main()
