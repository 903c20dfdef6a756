"""The HMEDN trainer: data, model, loss, optimiser, schedule, validation, logs and exact resume.

One run lives in ``TrainConfig.out``:

- ``split.json``: the deterministic train/validation case split (seeded permutation of the case names);
- ``last.pt`` / ``best.pt``: training checkpoints (:mod:`hmedn_fast.train.checkpoint`), readable by
  ``hmedn_fast.models.io.load_model`` and ``hmedn infer``; ``best.pt`` has the best mean validation Dice;
- ``log.csv`` / ``log.json``: one row per epoch (losses, learning rate, validation metrics, time);
- ``steps.csv``: one row per step (global step, epoch, step, loss, learning rate; ``nan`` for skipped steps),
  cut back to the checkpoint's position on resume so it matches an uninterrupted run;
- ``curves.png``: training loss and validation Dice per class against the epoch.

Training step: (on the model's device) augmentation, forward under autocast (bf16 on CUDA by default),
:class:`hmedn_fast.losses.HMEDNLoss` (weight and contour targets from the fast targets op; deep supervision on
the auxiliary heads; the fused loss kernel on CUDA), non-finite check, backward, gradient clipping, AdamW
(weight decay 1e-7 = the paper's beta), learning-rate schedule per step. A non-finite loss or gradient
norm skips the step with a warning; after ``max_nonfinite`` skipped steps the run saves and stops
(:class:`NonFiniteLossError`). An out-of-memory error escalates activation checkpointing and retries the step.

Validation (every ``val_every`` epochs and after the last): each validation case is segmented whole by
:func:`hmedn_fast.infer.sliding_window.sliding_window_inference` (window = the training patch; a 2D model
segments the case's slice stacks and the slices are stacked back into the volume), then Dice, ASSD and HD95
per class (:mod:`hmedn_fast.metrics`, in mm with the case's spacing). Distances are averaged over the cases
where both masks are non-empty (NaN if none is); Dice over all cases.
"""
from __future__ import annotations

import csv
import json
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hmedn_fast import metrics
from hmedn_fast.data.augment import AugmentConfig, augment_batch
from hmedn_fast.data.datasets import (PatchDataset, StepBatchSampler, Volume, check_volumes, collate,
                                      default_patch_size, load_volumes, read_or_write_split, to_slice_stacks)
from hmedn_fast.data.msd import slice_stack
from hmedn_fast.data.sampling import check_patch_size
from hmedn_fast.device import channels_last_format
from hmedn_fast.losses import HMEDNLoss
from hmedn_fast.models import MODELS, SegmentationOutput, create_model
from hmedn_fast.train import memory
from hmedn_fast.train.checkpoint import load_checkpoint, restore_rng_state, save_checkpoint
from hmedn_fast.train.config import (RESUMABLE_CHANGES, TrainConfig, automatic_cuda_graph, default_checkpointing,
                                     option_default)
from hmedn_fast.train.distributed import DistContext, all_reduce_mean, barrier, init_distributed, wrap_model
from hmedn_fast.train.graphed import GraphedStep

class NonFiniteLossError(RuntimeError):
    """Raised when more than ``max_nonfinite`` steps had a non-finite loss or gradient."""


def _lr_lambda(schedule: str, total: int):
    if schedule == "poly":
        return lambda step: max(1.0 - step / total, 0.0) ** 0.9
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))
    return lambda step: 1.0


class Trainer:
    """Build everything a run needs from a :class:`TrainConfig`; :meth:`fit` trains.

    Args:
        config: the run's options.
        ctx: distributed context (default: from torchrun's environment, or a single process).

    Attributes (after construction): ``model`` (DDP-wrapped when distributed; the bare model is
    ``self.net``), ``optimizer``, ``scheduler``, ``scaler``, ``loss_fn``, ``train_items`` / ``val_volumes``,
    ``patch_size``, ``batch_size``, ``num_classes``, ``spatial_dims``, ``history`` (epoch rows),
    ``memory_plan`` (a :class:`~hmedn_fast.train.memory.MemoryPlan` or None), ``checkpoint_level``,
    ``cuda_graph`` (whether steps replay a CUDA graph: the option, resolved).
    """

    def __init__(self, config: TrainConfig, ctx: DistContext | None = None) -> None:
        self.config = cfg = config
        self.ctx = ctx or init_distributed(cfg.device)
        self.device = self.ctx.device
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        resume_record = self._resume_record()

        spec = MODELS[cfg.model]
        self.spatial_dims = int(cfg.overrides.get("spatial_dims", spec.spatial_dims))
        volumes = load_volumes(cfg.data, spatial_dims=self.spatial_dims, max_cases=cfg.max_cases,
                               phantom_cases=cfg.phantom_cases, phantom_size=cfg.phantom_size, seed=cfg.seed)
        data_dims = volumes[0].label.ndim
        if self.spatial_dims == 3 and data_dims == 2:
            raise ValueError(f"model {cfg.model!r} is 3D but the data {cfg.data!r} is 2D")
        if resume_record:
            self.split = resume_record["split"]
        else:
            names = [v.name for v in volumes]
            if self.ctx.is_main:  # rank 0 writes split.json (or reads an existing one), the others read it
                read_or_write_split(self.out / "split.json", names, cfg.val_fraction, cfg.seed)
            barrier(self.ctx)
            self.split = read_or_write_split(self.out / "split.json", names, cfg.val_fraction, cfg.seed)
        by_name = {v.name: v for v in volumes}
        train_volumes = [by_name[n] for n in self.split["train"]]
        self.val_volumes = [by_name[n] for n in self.split["val"]]
        self.stacked = self.spatial_dims == 2 and data_dims == 3
        self.train_items = (to_slice_stacks(train_volumes, cfg.slices, cfg.slice_axis) if self.stacked
                            else train_volumes)

        labels_max = max(int(v.label.max()) for v in volumes)
        self.num_classes = int(cfg.num_classes or cfg.overrides.get("num_classes") or max(labels_max + 1, 2))
        self.in_channels = int(cfg.overrides.get("in_channels", self.train_items[0].image.shape[0]))
        check_volumes(self.train_items, self.num_classes, self.in_channels)
        check_volumes(self.val_volumes, self.num_classes,
                      self.in_channels // cfg.slices if self.stacked else self.in_channels)

        self.patch_size = check_patch_size(cfg.patch_size or default_patch_size(self.train_items), self.spatial_dims)
        self.batch_size = cfg.batch_size
        self.precision = ("bf16" if self.device.type == "cuda" else "fp32") if cfg.precision == "auto" else cfg.precision
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        channels_last = (cfg.memory_format == "channels_last"
                         or (cfg.memory_format == "auto" and self.device.type == "cuda"))
        self.memory_format = channels_last_format(self.spatial_dims) if channels_last else torch.contiguous_format
        if cfg.cudnn_benchmark and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if cfg.cuda_graph and (self.device.type != "cuda" or self.ctx.world_size > 1):
            raise ValueError(f"cuda_graph needs one process on a CUDA device, got device {self.device} and "
                             f"{self.ctx.world_size} process(es)")
        self.cuda_graph = automatic_cuda_graph(cfg, self.device, self.ctx.world_size, self.precision)
        self.loss_fn = HMEDNLoss(self.num_classes, aux_weights=cfg.aux_weight, check_values=False).to(self.device)

        self.memory_plan = resume_record.get("memory_plan") if resume_record else None
        self.checkpoint_level = cfg.checkpointing or default_checkpointing(self.device)
        if resume_record:
            self.checkpoint_level = resume_record["checkpoint_level"]
            self.patch_size, self.batch_size = tuple(resume_record["patch_size"]), resume_record["batch_size"]
            if self.memory_plan and self.device.type == "cuda":  # the budget stays a hard cap
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(self.memory_plan["budget_bytes"] / total, 1.0),
                                                           self.device)
        elif cfg.memory_budget is not None:
            self._plan_memory()
        torch.manual_seed(cfg.seed)
        self.net = self._build_model(self.checkpoint_level).to(self.device, memory_format=self.memory_format)
        self.model = wrap_model(self.net, self.ctx, cfg.sync_bn, self.checkpoint_level)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.escalator = memory.OOMEscalator(self.checkpoint_level)

        # fused: its update skips itself on the device when found_inf is set (non-finite steps need no host sync)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=self._lr(cfg.lr), betas=cfg.betas,
                                           weight_decay=cfg.weight_decay, fused=True, capturable=self.cuda_graph)
        total = cfg.epochs * cfg.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg.schedule, total))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.augment = (AugmentConfig(slice_groups=cfg.slices if self.stacked else None) if cfg.augment else None)
        self.dataset = PatchDataset(self.train_items, self.patch_size, cfg.steps_per_epoch * self.batch_size
                                    * self.ctx.world_size, seed=cfg.seed, foreground_prob=cfg.foreground_prob)

        self.history: list[dict[str, Any]] = []
        self.best = {"score": -math.inf, "epoch": None}
        self.nonfinite = 0
        self.position: dict[str, Any] = {"epoch": 0, "step": 0, "sums": {}, "count": 0, "time": 0.0}
        if resume_record:
            self._restore(resume_record)
        self.step_fn = GraphedStep(self._step_tensors) if self.cuda_graph else self._step_tensors
        self._part_names: list[str] = []  # the loss parts' names, in the order _step_tensors returns them

    def describe(self) -> str:
        """One line of what this run trains and how: model, device, precision, layout, checkpointing level, CUDA
        graph, patch x batch (x processes; on CUDA, which BatchNorm)."""
        layout = "contiguous" if self.memory_format == torch.contiguous_format else "channels-last"
        procs = f" x {self.ctx.world_size} processes" if self.ctx.world_size > 1 else ""
        if self.ctx.world_size > 1 and self.device.type == "cuda":
            procs += ", SyncBatchNorm" if self.config.sync_bn else ", per-GPU BatchNorm"
        return (f"{self.config.model} on {self.device}, {self.precision}, {layout}, checkpointing "
                f"{self.checkpoint_level}, CUDA graph {'on' if self.cuda_graph else 'off'}, patch "
                f"{tuple(self.patch_size)} x batch {self.batch_size}{procs}")

    # ------------------------------------------------------------------------------------------ set-up
    def _resume_record(self) -> dict[str, Any] | None:
        if not self.config.resume:
            return None
        record = load_checkpoint(self.out / "last.pt")
        stored = record.get("config", {})
        now = self.config.to_dict()
        # an option the checkpoint's version did not have yet ran as its default
        stored = {k: stored.get(k, option_default(k)) for k in now}
        differ = {k: (stored[k], now[k]) for k in now
                  if k not in RESUMABLE_CHANGES and jsonable(stored[k]) != jsonable(now[k])}
        if differ:
            raise ValueError(f"cannot resume {self.out / 'last.pt'}: options differ from the checkpoint's "
                             f"(stored, now): {differ}")
        return record

    def _lr(self, lr: float | torch.Tensor) -> float | torch.Tensor:
        """The optimizer's learning rate: a device tensor on CUDA (the fused update reads it from device memory, so a
        replayed CUDA graph sees the scheduler's in-place updates; one form for eager and graphed steps), else a
        float."""
        return torch.tensor(float(lr), device=self.device) if self.device.type == "cuda" else float(lr)

    def _host_lr(self) -> float:
        """The scheduler's current learning rate as a float, without reading a device tensor back."""
        return self.config.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)

    def _build_model(self, level: str) -> torch.nn.Module:
        model = create_model(self.config.model, in_channels=self.in_channels, num_classes=self.num_classes,
                             **{k: v for k, v in self.config.overrides.items() if k not in ("in_channels", "num_classes")})
        memory.set_checkpointing(model, level)
        return model

    def _plan_memory(self) -> None:
        if self.device.type != "cuda":
            raise ValueError("memory_budget needs a CUDA device (it is planned by measuring GPU memory)")
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = memory.parse_memory_budget(self.config.memory_budget, total)
        measure = memory.cuda_step_measurer(self._build_model, self.loss_fn, self.in_channels, self.num_classes,
                                            self.device, self.autocast_dtype, self.memory_format)
        plan = memory.plan_memory(budget, self.patch_size, self.batch_size, measure,
                                  progress=self.config.progress and self.ctx.is_main)
        torch.cuda.set_per_process_memory_fraction(min(budget / total, 1.0), self.device)
        self.memory_plan = asdict(plan)
        self.checkpoint_level, self.patch_size, self.batch_size = plan.level, plan.patch_size, plan.batch_size
        if self.ctx.is_main:
            print(plan.describe(), flush=True)

    def _restore(self, record: dict[str, Any]) -> None:
        self.net.load_state_dict(record["state_dict"])
        self.optimizer.load_state_dict(record["optimizer"])
        self.scheduler.load_state_dict(record["scheduler"])
        for group in self.optimizer.param_groups:  # a loaded learning rate may be a tensor on another device, and
            group["lr"] = self._lr(group["lr"])    # the saved run may have stepped with(out) a CUDA graph: the
            group["capturable"] = self.cuda_graph  # loaded groups carry its capturable flag, this run's must hold
        self.scaler.load_state_dict(record["scaler"])
        self.history, self.best, self.nonfinite = record["history"], record["best"], record["nonfinite"]
        self.position = dict(record["position"])
        restore_rng_state(record["rng"])
        steps = self.out / "steps.csv"
        if self.ctx.is_main and steps.exists():  # drop the steps run after the checkpoint was written
            done = self.position["epoch"] * self.config.steps_per_epoch + self.position["step"]
            lines = steps.read_text().splitlines(keepends=True)
            steps.write_text("".join(lines[:1] + [ln for ln in lines[1:] if int(ln.split(",")[0]) <= done]))
        if self.ctx.is_main:
            print(f"resumed {self.out / 'last.pt'} at epoch {self.position['epoch']} step {self.position['step']}",
                  flush=True)

    # ------------------------------------------------------------------------------------------ steps
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float] | None:
        """One optimiser step on a batch already on the device (images float32 (N, C, *patch), labels
        integer (N, *patch)). Returns the loss parts (``"loss"`` = total) as floats, or None when the step was
        skipped (non-finite loss or gradient). Retries with more checkpointing after an out-of-memory error."""
        while True:
            try:
                return self._step(images, labels)
            except torch.OutOfMemoryError:
                self._free_step_memory()
                level = self.escalator.escalate()
                if level is None:
                    raise
                warnings.warn(f"out of memory in a training step: escalating activation checkpointing to {level!r} "
                              f"and retrying", RuntimeWarning, stacklevel=2)
                memory.set_checkpointing(self.net, level)
                self.checkpoint_level = level

    def _free_step_memory(self) -> None:
        """Drop what the training step holds between steps: the gradients, the CUDA graph and its pool (the next
        step warms up and captures again, e.g. at a new checkpointing level) and the allocator's cached blocks."""
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.step_fn, GraphedStep):
            self.step_fn.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float] | None:
        *vals, finite = self.step_fn(images, labels).tolist()  # the step's one host synchronisation
        if not finite:
            return self._skip("loss" if not math.isfinite(vals[0]) else "gradient norm")
        self.scheduler.step()
        return {"loss": vals[0], **dict(zip(self._part_names, vals[1:]))}

    def _step_tensors(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One step without host synchronisation (CUDA-graph capturable): float32 ``[loss, *parts, finite]``.
        A non-finite loss or gradient norm (fp32 / bf16) makes the fused AdamW skip its update on the device;
        with fp16 the gradient scaler skips non-finite gradients itself."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        images = images.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            out = self.model(images)
        if not self.config.deep_supervision:
            out = SegmentationOutput(out.seg, out.contour, [])
        loss = self.loss_fn(out, labels)
        self._part_names = list(loss.parts)
        values = torch.stack([loss.total.detach().float(), *[p.float() for p in loss.parts.values()]])
        values = all_reduce_mean(values, self.ctx)
        self.scaler.scale(loss.total).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.grad_clip or math.inf)
        finite = torch.isfinite(values[0])
        if self.precision == "fp16":
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            finite = finite & torch.isfinite(norm)
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        return torch.cat([values, finite.float()[None]])

    def _skip(self, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite += 1
        warnings.warn(f"non-finite {what} at epoch {self.position['epoch']} step {self.position['step']}: step "
                      f"skipped ({self.nonfinite} so far, max_nonfinite={self.config.max_nonfinite})",
                      RuntimeWarning, stacklevel=3)
        if self.nonfinite > self.config.max_nonfinite:
            self._save("last.pt")
            raise NonFiniteLossError(f"{self.nonfinite} training steps had a non-finite loss or gradient "
                                     f"(max_nonfinite={self.config.max_nonfinite}); stopping. Lower the learning "
                                     f"rate or check the data.")
        return None

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train from the current position to ``epochs``; returns ``{"best", "history", "out"}``."""
        cfg = self.config
        loader_gen = torch.Generator()  # keeps DataLoader from drawing on the global RNG (exact resume)
        while self.position["epoch"] < cfg.epochs:
            epoch, start = self.position["epoch"], self.position["step"]
            self.dataset.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=StepBatchSampler(cfg.steps_per_epoch, self.batch_size, start,
                                                             self.ctx.rank, self.ctx.world_size),
                collate_fn=collate, num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                generator=loader_gen)
            bar = tqdm(loader, total=cfg.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not (cfg.progress and self.ctx.is_main), leave=False)
            tick = time.perf_counter()
            for images, labels, seeds in bar:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                if self.augment is not None:
                    images, labels = augment_batch(images, labels, seeds, self.augment)
                lr = self._host_lr()
                parts = self.train_step(images, labels)
                self._log_step(parts, lr)
                pos = self.position
                if parts is not None:
                    for k, v in parts.items():
                        pos["sums"][k] = pos["sums"].get(k, 0.0) + v
                    pos["count"] += 1
                    bar.set_postfix(loss=f"{parts['loss']:.4f}")
                pos["step"] += 1
                if cfg.checkpoint_every and pos["step"] % cfg.checkpoint_every == 0 and pos["step"] < cfg.steps_per_epoch:
                    pos["time"] += time.perf_counter() - tick
                    tick = time.perf_counter()
                    self._save("last.pt")
            bar.close()
            self.position["time"] += time.perf_counter() - tick
            self._end_epoch()
        return {"best": self.best, "history": self.history, "out": str(self.out)}

    def _log_step(self, parts: dict[str, float] | None, lr: float) -> None:
        if not self.ctx.is_main:
            return
        path = self.out / "steps.csv"
        new = not path.exists()
        pos = self.position
        with open(path, "a") as f:
            if new:
                f.write("global_step,epoch,step,loss,lr\n")
            loss = parts["loss"] if parts is not None else math.nan
            f.write(f"{pos['epoch'] * self.config.steps_per_epoch + pos['step'] + 1},{pos['epoch'] + 1},"
                    f"{pos['step'] + 1},{loss!r},{lr!r}\n")

    def _end_epoch(self) -> None:
        cfg, pos = self.config, self.position
        epoch = pos["epoch"]
        row: dict[str, Any] = {"epoch": epoch + 1, "step": (epoch + 1) * cfg.steps_per_epoch,
                               "lr": self._host_lr(), "skipped_steps": self.nonfinite,
                               "checkpointing": self.checkpoint_level, "cuda_graph": self.cuda_graph,
                               "time_s": round(pos["time"], 3)}
        row.update({f"train_{k}": v / max(pos["count"], 1) for k, v in pos["sums"].items()})
        improved = False
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            if self.memory_plan is not None and isinstance(self.step_fn, GraphedStep):
                # the graph's private pool keeps the training step's peak reserved, where validation cannot use it:
                # under a memory budget that is most of the cap. Without a budget the graph stays (recapturing
                # costs ~2 % of an epoch).
                self._free_step_memory()
            if self.ctx.is_main:
                row.update(self.validate())
                if row["val_dice_mean"] > self.best["score"]:
                    self.best = {"score": row["val_dice_mean"], "epoch": epoch + 1}
                    improved = True
            barrier(self.ctx)
        self.history.append(row)
        self.position = {"epoch": epoch + 1, "step": 0, "sums": {}, "count": 0, "time": 0.0}
        self._save("last.pt")
        if improved:
            self._save("best.pt")
        if self.ctx.is_main:
            self._write_logs()

    def _save(self, name: str) -> None:
        if not self.ctx.is_main:
            return
        save_checkpoint(self.out / name, self.model, self.optimizer, self.scheduler, self.scaler, self.position,
                        history=self.history, best=self.best, nonfinite=self.nonfinite,
                        config=self.config.to_dict(), split=self.split, memory_plan=self.memory_plan,
                        checkpoint_level=self.checkpoint_level, patch_size=list(self.patch_size),
                        batch_size=self.batch_size, spatial_dims=self.spatial_dims,
                        slices=self.config.slices if self.stacked else None,
                        slice_axis=self.config.slice_axis if self.stacked else None)

    # ------------------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def predict(self, volume: Volume) -> np.ndarray:
        """Label map (*spatial) uint8 of one case, segmented whole (see the module doc)."""
        from hmedn_fast.infer.engines import EagerEngine
        from hmedn_fast.infer.sliding_window import sliding_window_inference

        engine = EagerEngine(self.net, device=self.device, dtype=self.autocast_dtype or torch.float32, fuse=False,
                             channels_last=self.memory_format != torch.contiguous_format)
        if self.stacked:
            stacks, _ = slice_stack(volume.image, volume.label, axis=self.config.slice_axis, slices=self.config.slices)
            image = torch.from_numpy(stacks)
        else:
            image = torch.from_numpy(volume.image)[None]
        probs = sliding_window_inference(image, engine, self.patch_size, overlap=0.25, sw_batch_size=8).probabilities
        labels = probs.argmax(1).to(torch.uint8).cpu().numpy()
        return np.moveaxis(labels, 0, self.config.slice_axis) if self.stacked else labels[0]

    def validate(self) -> dict[str, float]:
        """Dice / ASSD / HD95 per class over the validation cases: ``val_dice_<k>``, ``val_assd_<k>``,
        ``val_hd95_<k>`` for k = 1..K-1 and ``val_dice_mean`` (mean over classes)."""
        k = self.num_classes
        dice, assd, hd95 = [], [], []
        for v in self.val_volumes:
            pred = self.predict(v)
            dice.append(metrics.dice(pred, v.label, num_classes=k))
            assd.append(metrics.assd(pred, v.label, spacing=v.spacing, num_classes=k))
            hd95.append(metrics.hausdorff(pred, v.label, spacing=v.spacing, percentile=95, num_classes=k))
        out: dict[str, float] = {}
        dice_mean = np.mean(dice, axis=0)
        for name, values in (("assd", assd), ("hd95", hd95)):
            arr = np.array(values)
            arr[~np.isfinite(arr)] = np.nan
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                means = np.nanmean(arr, axis=0)
            out.update({f"val_{name}_{c}": float(means[c - 1]) for c in range(1, k)})
        out.update({f"val_dice_{c}": float(dice_mean[c - 1]) for c in range(1, k)})
        out["val_dice_mean"] = float(dice_mean.mean())
        return out

    # ------------------------------------------------------------------------------------------ logs
    def _write_logs(self) -> None:
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        with open(self.out / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)
        log = {"config": self.config.to_dict(), "best": self.best, "memory_plan": self.memory_plan,
               "history": self.history}
        (self.out / "log.json").write_text(json.dumps(jsonable(log), indent=1, allow_nan=False))
        plot_curves(self.history, self.out / "curves.png")


def plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """PNG of the training loss and the validation Dice per class against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    for key in ("train_loss", "train_seg", "train_contour"):
        if any(key in r for r in history):
            ax_loss.plot(epochs, [r.get(key, np.nan) for r in history], label=key[6:])
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_loss.legend()
    val = [r for r in history if "val_dice_mean" in r]
    for key in sorted({k for r in val for k in r if k.startswith("val_dice_")}):
        ax_dice.plot([r["epoch"] for r in val], [r[key] for r in val], marker="o", label=key[9:])
    ax_dice.set(xlabel="epoch", ylabel="validation Dice", ylim=(0, 1))
    if val:
        ax_dice.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples -> lists, unknown objects -> str, NaN / inf -> None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return json.loads(json.dumps(value, default=str))


__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "jsonable", "plot_curves"]
