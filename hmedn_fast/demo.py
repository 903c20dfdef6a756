"""``hmedn demo``: train HMEDN and a U-Net on the same data and budget, compare them on held-out images.

By default the data is the synthetic low-contrast phantom (:mod:`hmedn_fast.data.phantom`, 2D slabs of 5
slices, 4 classes). ``--data PATH`` uses an MSD-layout folder instead (:mod:`hmedn_fast.data.msd`: 2D
stacks of 5 adjacent slices along the NIfTI z axis, classes from the labels, an 80/20 split of the cases
drawn with the seed, metrics per test volume in 3D with its voxel spacing).

Both models see the same batches in the same order with the same augmentation (slice-order reversal, the
paper's 2D flip, and a small intensity jitter) for the same number of steps, with the same optimiser
(AdamW, weight decay 1e-7, one-cycle learning rate peaking at 3e-3). ``hmedn_2d`` is trained with
:class:`~hmedn_fast.losses.HMEDNLoss` (difficulty-guided CE + contour regression + deep supervision),
``unet_2d`` with plain cross-entropy. On a CPU both networks are built at a quarter of the paper's widths
(``--width-divisor``; full widths on a GPU) so that the default run ends within 5 minutes on 2 cores.

Outputs in ``--out`` (default ``./hmedn_demo_out``): ``results.json`` (settings, parameter counts, timings,
per-structure Dice / ASSD / HD95 of each model), ``comparison.png`` (image, truth, both predictions),
``predictions.npz`` (truth and predictions of every test case, keys ``<case>/truth`` and ``<case>/<model>``).
Distances are in mm; a structure missed entirely (infinite distance) is left out of the distance means and
counted under ``missed``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hmedn_fast import metrics
from hmedn_fast.data.augment import AugmentConfig, augment_batch
from hmedn_fast.data.msd import MSDSliceDataset, find_msd_cases, load_msd_case, slice_stack
from hmedn_fast.data.phantom import PHANTOM_CLASSES, PhantomDataset
from hmedn_fast.data.sampling import sample_seed
from hmedn_fast.device import resolve_device
from hmedn_fast.losses import HMEDNLoss
from hmedn_fast.models import count_parameters, create_model

MODELS = ("hmedn_2d", "unet_2d")
_PAPER_WIDTHS = {
    "hmedn_2d": dict(widths=(32, 64, 128, 256, 512), growth_rates=(12, 16, 24, 32, 48), hr_channels=56),
    "unet_2d": dict(widths=(52, 104, 208, 416, 832)),
}


@dataclass(frozen=True)
class DemoSettings:
    """Budget of a demo run (both models get the same).

    Attributes:
        size: phantom image side in pixels (ignored with ``--data``).
        train_samples, test_samples: phantom samples for training and held-out evaluation.
        epochs: passes over the training samples.
        batch_size: samples per optimisation step.
        max_lr: peak learning rate of the one-cycle schedule.
    """

    size: int = 64
    train_samples: int = 192
    test_samples: int = 24
    epochs: int = 20
    batch_size: int = 8
    max_lr: float = 3e-3


DEFAULT = DemoSettings()
QUICK = DemoSettings(train_samples=64, test_samples=8, epochs=14)
MSD_EPOCHS = 1


class _Case(NamedTuple):
    """A held-out case: (S, C, h, w) input stacks, (S, h, w) labels, spacing in mm of the metric's axes
    ((h, w) for a single 2D image, S == 1; (S, h, w) for a volume)."""

    name: str
    stack: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, ...]


@dataclass
class _Split:
    """Training arrays (N, C, h, w) / (N, h, w), held-out cases and class names (index = label)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test: list[_Case]
    class_names: list[str]


def _phantom_split(s: DemoSettings, seed: int, progress: bool) -> _Split:
    ds = PhantomDataset(s.train_samples + s.test_samples, seed=seed, size=s.size)
    items = [ds[i] for i in tqdm(range(len(ds)), desc="phantom", disable=not progress, leave=False)]
    images = np.stack([im.numpy() for im, _ in items])
    labels = np.stack([lab.numpy().astype(np.uint8) for _, lab in items])
    n = s.train_samples
    test = [_Case(f"phantom_{i:03d}", images[i:i + 1], labels[i:i + 1], ds.config.spacing)
            for i in range(n, len(items))]
    return _Split(images[:n], labels[:n], test, list(PHANTOM_CLASSES))


def _msd_split(root: Path, seed: int, max_cases: int | None) -> _Split:
    pairs = find_msd_cases(root)
    order = np.random.default_rng(seed).permutation(len(pairs))
    pairs = [pairs[i] for i in order[: max_cases or len(pairs)]]
    if len(pairs) < 2:
        raise ValueError(f"--data {root}: need at least 2 cases (training and test), got {len(pairs)}")
    n_test = max(1, round(0.2 * len(pairs)))
    train = MSDSliceDataset(pairs[n_test:])
    test, num_classes = [], train.num_classes
    for image_path, label_path in pairs[:n_test]:
        vol = load_msd_case(image_path, label_path)
        stack, lab = slice_stack(vol.image, vol.label, axis=2)
        spacing = (vol.spacing[2], vol.spacing[0], vol.spacing[1])  # slice axis first, as slice_stack puts it
        test.append(_Case(vol.name, stack, lab, spacing))
        num_classes = max(num_classes, int(vol.label.max()) + 1)
    names = _msd_class_names(root, num_classes)
    return _Split(train.images, train.labels, test, names)


def _msd_class_names(root: Path, num_classes: int) -> list[str]:
    """Names from ``dataset.json`` ("labels": {"0": "background", ...}) when present, else "class k"."""
    names = ["background"] + [f"class {k}" for k in range(1, num_classes)]
    try:
        labels = json.loads((root / "dataset.json").read_text())["labels"]
        for k in range(num_classes):
            names[k] = str(labels.get(str(k), names[k]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return names


def _build(name: str, in_channels: int, num_classes: int, divisor: int) -> torch.nn.Module:
    widths = {k: tuple(max(2, w // divisor) for w in v) if isinstance(v, tuple) else max(2, v // divisor)
              for k, v in _PAPER_WIDTHS[name].items()}
    return create_model(name, in_channels=in_channels, num_classes=num_classes, **widths)


def _train(model: torch.nn.Module, loss_fn, split: _Split, s: DemoSettings, device: torch.device, seed: int,
           progress: bool, desc: str) -> list[float]:
    """Same batches, augmentation and schedule for every model (all drawn from ``seed``)."""
    x_all, y_all = torch.from_numpy(split.train_images), torch.from_numpy(split.train_labels.astype(np.int64))
    steps_per_epoch = math.ceil(len(x_all) / s.batch_size)
    total = steps_per_epoch * s.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.max_lr / 25, betas=(0.9, 0.999), weight_decay=1e-7)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.max_lr, total_steps=total)
    augment = AugmentConfig(flip=False, rotate90=False, slice_groups=x_all.shape[1])
    model.to(device).train()
    losses = []
    with tqdm(total=total, desc=desc, disable=not progress, unit="step") as bar:
        for epoch in range(s.epochs):
            order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(sample_seed(seed, epoch, 0)))
            for b in range(steps_per_epoch):
                idx = order[b * s.batch_size:(b + 1) * s.batch_size]
                seeds = [sample_seed(seed, epoch, int(i) + 1) for i in idx]
                x, y = augment_batch(x_all[idx], y_all[idx], seeds, augment)
                out = model(x.to(device))
                loss = loss_fn(out, y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
    return losses


@torch.no_grad()
def _predict(model: torch.nn.Module, stack: np.ndarray, device: torch.device, batch: int) -> np.ndarray:
    model.eval()
    parts = [model(torch.from_numpy(stack[i:i + batch]).to(device)).seg.argmax(1).cpu()
             for i in range(0, len(stack), batch)]
    return torch.cat(parts).numpy().astype(np.uint8)


def _evaluate(preds: list[np.ndarray], split: _Split) -> dict[str, Any]:
    """Per-structure mean Dice / ASSD / HD95 over the test cases (3D when a case has several slices)."""
    k = len(split.class_names)
    rows = {"dice": [], "assd": [], "hd95": []}
    for pred, case in zip(preds, split.test):
        p, t = (pred[0], case.truth[0]) if case.truth.shape[0] == 1 else (pred, case.truth)
        rows["dice"].append(metrics.dice(p, t, num_classes=k))
        rows["assd"].append(metrics.assd(p, t, spacing=case.spacing, num_classes=k))
        rows["hd95"].append(metrics.hausdorff(p, t, spacing=case.spacing, percentile=95, num_classes=k))
    table = {name: np.array(v) for name, v in rows.items()}  # (cases, K - 1)
    out: dict[str, Any] = {}
    for c, name in enumerate(split.class_names[1:]):
        entry = {"dice": float(table["dice"][:, c].mean())}
        for m in ("assd", "hd95"):
            finite = table[m][:, c][np.isfinite(table[m][:, c])]
            entry[m] = float(finite.mean()) if finite.size else None
        entry["missed"] = int((~np.isfinite(table["assd"][:, c])).sum())
        out[name] = entry
    out["mean"] = {m: _mean([out[n][m] for n in split.class_names[1:]]) for m in ("dice", "assd", "hd95")}
    return out


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def format_table(results: dict[str, Any], class_names: list[str]) -> str:
    """Plain-text table: one row per structure (and the mean), Dice / ASSD / HD95 of each model."""
    def cell(v: float | None, digits: int) -> str:
        return f"{v:.{digits}f}" if v is not None else "-"

    models = list(results)
    pair = "/".join(m.split("_")[0] for m in models)
    head = f"{'structure':<14}" + "".join(f"| {f'{metric} {pair}':>26} " for metric in ("Dice", "ASSD mm", "HD95 mm"))
    lines = [head, "-" * len(head)]
    for name in class_names[1:] + ["mean"]:
        row = f"{name:<14}"
        for metric, digits in (("dice", 3), ("assd", 2), ("hd95", 2)):
            row += "| " + " / ".join(cell(results[m]["metrics"][name][metric], digits) for m in models).rjust(26) + " "
        lines.append(row)
    return "\n".join(lines)


def _figure(path: Path, split: _Split, preds: dict[str, list[np.ndarray]], results: dict[str, Any]) -> None:
    """Two held-out cases (rows): middle input slice, truth, U-Net and HMEDN predictions over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colors = plt.get_cmap("tab10").colors
    k = len(split.class_names)
    cmap = ListedColormap([(0, 0, 0, 0)] + [(*colors[i % 10], 1.0) for i in range(k - 1)])
    cases = list(range(min(2, len(split.test))))
    columns = [("truth", None), *((m, m) for m in ("unet_2d", "hmedn_2d"))]
    aspect = split.test[0].truth.shape[1] / split.test[0].truth.shape[2]  # panel height / width
    fig, axes = plt.subplots(len(cases), 4, figsize=(12, (3 * aspect + 0.4) * len(cases) + 0.8), squeeze=False,
                             layout="constrained")
    for row, i in enumerate(cases):
        name, stack, truth, _ = split.test[i]
        s = int(np.argmax([(t > 0).sum() for t in truth]))  # slice with the most foreground
        image = stack[s, stack.shape[1] // 2]
        panels = [("image", None)] + [(title, truth[s] if m is None else preds[m][i][s]) for title, m in columns]
        for col, (title, lab) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=np.percentile(image, 1), vmax=np.percentile(image, 99))
            if lab is not None:
                ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=k - 1, alpha=0.45,
                          interpolation="nearest")
                ax.contour(truth[s], levels=np.arange(k) + 0.5, colors="white", linewidths=0.6)
            if col >= 2:
                d = metrics.dice(lab, truth[s], num_classes=k)
                title = f"{title} (slice Dice {np.mean(d):.3f})"
            ax.set_title(f"{name}: {title}" if col == 0 else title, fontsize=9)
            ax.axis("off")
    handles = [Patch(color=colors[(c - 1) % 10], label=split.class_names[c]) for c in range(1, k)]
    handles.append(Patch(facecolor="none", edgecolor="black", label="truth contour (white)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=k + 1, fontsize=9, frameon=False)
    means = ", ".join(f"{m}: mean Dice {results[m]['metrics']['mean']['dice']:.3f}" for m in MODELS)
    fig.suptitle(f"Held-out cases. {means}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: str | Path = "hmedn_demo_out", *, data: str | Path | None = None, epochs: int | None = None,
             device: str | None = None, seed: int = 0, quick: bool = False, max_cases: int | None = None,
             width_divisor: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the comparison and write the outputs (see the module doc); returns what ``results.json`` holds.

    Args:
        out: output folder (created).
        data: MSD-layout folder, or None for the phantom.
        epochs: training epochs (default 20 on the phantom, 14 with ``quick``, 1 on MSD data).
        device: "auto" (None), "cpu", "cuda" or "cuda:N".
        seed: seeds the data, the initialisation, the batch order and the augmentation.
        quick: smaller phantom budget (CI smoke run).
        max_cases: MSD only: use at most this many cases (drawn with the seed).
        width_divisor: divide the paper's channel widths by this (default 4 on CPU, 1 on CUDA).
        progress: show tqdm progress bars (on stderr).
    """
    for name, value, low in (("epochs", epochs, 1), ("max_cases", max_cases, 2), ("width_divisor", width_divisor, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be an int >= {low} or None, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if max_cases is not None and data is None:
        raise ValueError("max_cases applies only with data (an MSD folder)")
    dev = resolve_device(device)
    settings = QUICK if quick else DEFAULT
    settings = replace(settings, epochs=epochs or (MSD_EPOCHS if data is not None else settings.epochs))
    divisor = width_divisor or (1 if dev.type == "cuda" else 4)
    start = time.perf_counter()
    split = (_phantom_split(settings, seed, progress) if data is None
             else _msd_split(Path(data), seed, max_cases))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    num_classes, in_channels = len(split.class_names), split.train_images.shape[1]
    results: dict[str, Any] = {}
    preds: dict[str, list[np.ndarray]] = {}
    for name in MODELS:
        torch.manual_seed(seed)
        model = _build(name, in_channels, num_classes, divisor)
        if name == "hmedn_2d":
            hmedn_loss = HMEDNLoss(num_classes).to(dev)
            loss_fn = lambda o, y: hmedn_loss(o, y).total  # noqa: E731
        else:
            loss_fn = lambda o, y: F.cross_entropy(o.seg, y)  # noqa: E731
        t0 = time.perf_counter()
        losses = _train(model, loss_fn, split, settings, dev, seed, progress, f"train {name}")
        t1 = time.perf_counter()
        preds[name] = [_predict(model, stack, dev, settings.batch_size * 4) for _, stack, _, _ in split.test]
        results[name] = {"parameters": count_parameters(model), "loss": "HMEDNLoss" if name == "hmedn_2d" else
                         "cross-entropy", "train_seconds": round(t1 - t0, 2), "steps": len(losses),
                         "final_loss": float(np.mean(losses[-10:])), "metrics": _evaluate(preds[name], split)}
    table = format_table(results, split.class_names)
    _figure(out / "comparison.png", split, preds, results)
    saved = {f"{case.name}/truth": case.truth for case in split.test}
    saved.update({f"{case.name}/{m}": preds[m][i] for i, case in enumerate(split.test) for m in MODELS})
    np.savez_compressed(out / "predictions.npz", **saved)
    summary = {
        "data": str(data) if data is not None else "phantom",
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "seed": seed, "quick": quick, "width_divisor": divisor, "settings": asdict(settings),
        "train_samples": int(len(split.train_images)), "test_cases": [c.name for c in split.test],
        "spacing_mm": {c.name: list(c.spacing) for c in split.test}, "classes": split.class_names, "models": results,
        "total_seconds": round(time.perf_counter() - start, 2), "table": table.splitlines(),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``demo`` on an ``argparse`` subparsers object (sets ``func=command``)."""
    parser = subparsers.add_parser("demo", help="train HMEDN and a U-Net on a low-contrast phantom and compare",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="MSD-layout folder (imagesTr/, labelsTr/) instead of the synthetic phantom")
    parser.add_argument("--out", type=Path, default=Path("hmedn_demo_out"), help="output folder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default: {DEFAULT.epochs} phantom, {QUICK.epochs} --quick, "
                             f"{MSD_EPOCHS} --data)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smaller phantom budget (smoke test, ~1 minute)")
    parser.add_argument("--max-cases", type=int, default=None, help="with --data: use at most this many cases")
    parser.add_argument("--width-divisor", type=int, default=None,
                        help="divide the paper's channel widths by this (default: 4 on CPU, 1 on CUDA)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=command)
    return parser


def command(args: argparse.Namespace) -> int:
    """Run ``hmedn demo`` with parsed arguments; prints the table. Exit status 0, or 2 for bad options/data."""
    try:
        summary = run_demo(args.out, data=args.data, epochs=args.epochs, device=args.device, seed=args.seed,
                           quick=args.quick, max_cases=args.max_cases, width_divisor=args.width_divisor,
                           progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"hmedn demo: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary["table"]))
    print(f"device {summary['device']}, {summary['total_seconds']:.0f} s; wrote {args.out}/results.json, "
          f"comparison.png, predictions.npz")
    return 0
