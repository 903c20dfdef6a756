"""Training options: :class:`TrainConfig` (every option of ``hmedn train``, checked when built) and the automatic
choices made from it on a device (:func:`automatic_cuda_graph`, :func:`default_checkpointing`)."""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch

from hmedn_fast.models import MODELS
from hmedn_fast.train import memory

SCHEDULES = ("poly", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# options that may differ between a run and its resumption; every other one must match
RESUMABLE_CHANGES = ("epochs", "val_every", "progress", "num_workers", "device", "threads", "resume",
                     "checkpoint_every", "max_nonfinite", "memory_format", "compile", "cudnn_benchmark",
                     "cuda_graph")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


@dataclass
class TrainConfig:
    """Options of a training run (validated on construction: ValueError/TypeError naming the option).

    Attributes:
        data: ``"phantom"``, an MSD folder (imagesTr/labelsTr) or a PNG folder (images/labels).
        out: run folder (created).
        model: name for :func:`hmedn_fast.models.create_model`; ``overrides``: its constructor overrides
            (``in_channels`` / ``num_classes`` default to the data's).
        num_classes: classes incl. background; default: the model override, else 1 + the largest label.
        slices, slice_axis: 2D model on 3D data: adjacent slices per stack and the axis cut along.
        patch_size: training patch (one int per model spatial axis); default: covering every case, rounded
            up to 16 (whole-volume training).
        batch_size: per-process batch (the global batch is ``batch_size * world_size``).
        epochs, steps_per_epoch: run length.
        lr, weight_decay, betas: AdamW (paper: 1e-3, 1e-7, (0.9, 0.999)).
        schedule: ``"poly"`` ((1 - t/T)^0.9), ``"cosine"`` or ``"constant"``, stepped per iteration.
        precision: ``"auto"`` (bf16 on CUDA, fp32 on the CPU), ``"fp32"``, ``"bf16"`` or ``"fp16"`` (with a
            gradient scaler).
        deep_supervision: use the auxiliary heads' losses; ``aux_weight`` their weight.
        grad_clip: gradient-norm clipping (None: measure only, for the non-finite check).
        val_every: validate every N epochs (and after the last); ``val_fraction``: share of validation cases.
        max_cases: use only the first N cases of the source.
        foreground_prob: patch centred on a foreground voxel with this probability.
        augment: flips, 90-degree rotations, intensity scale/shift (slice-order reversal for slice stacks).
        seed: seeds the split, the samples, the augmentation and the model initialisation.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        num_workers: data-loader worker processes.
        checkpoint_every: also write ``last.pt`` every N steps inside an epoch (0: at epoch ends only).
        max_nonfinite: stop after this many skipped (non-finite) steps.
        memory_format: ``"auto"`` (channels-last on CUDA, where cuDNN's convolutions are fastest in it; contiguous
            on the CPU), ``"channels_last"`` or ``"contiguous"``: layout of the model's weights and of the batches.
        compile: ``torch.compile`` the model for the training steps (the first steps compile: ~90 s for
            hmedn_3d_l2 at 128^3 on an H200; validation and the memory planner's trial steps run uncompiled).
            At the ``"stages"`` level its recomputed parts run eagerly (graph breaks).
        cudnn_benchmark: let cuDNN time its convolution algorithms on the first step of each shape (CUDA only;
            sets ``torch.backends.cudnn.benchmark`` for the process).
        cuda_graph: capture the whole training step (forward, loss, backward, clipping, AdamW) in a CUDA graph
            after two eager steps and replay it (:class:`hmedn_fast.train.graphed.GraphedStep`): no per-kernel
            launch cost on the host; the step's peak memory stays reserved between steps (under a
            ``memory_budget`` the graph is freed before each validation and captured again after it). ``None`` (default): on wherever it can
            run, i.e. one process on a CUDA device, precision fp32 / bf16, no ``compile`` (with ``memory_budget``
            too: the planner's trial steps run eagerly, and a capture that runs out of memory escalates
            checkpointing like an eager step does, then warms up and captures again); ``True`` forces it
            (ValueError where it cannot run), ``False`` keeps eager steps.
        sync_bn: several processes on CUDA: BatchNorm statistics over the global batch (``SyncBatchNorm``), as
            one process with the global batch computes them. SyncBatchNorm cannot run in the memory-lean blocks
            (their statistics would span processes), so with it the ``"lean"`` level's BatchNorm blocks run eager and
            ``"blocks"`` / ``"stages"`` checkpoint them (the trainer warns); ``False`` keeps BatchNorm per process
            (statistics over each GPU's batch) and the lean blocks. No effect in one process or on the CPU.
        memory_budget: e.g. ``"8GiB"`` or ``"0.5"`` (of the GPU): plan checkpointing / batch / patch by trial
            steps and cap the process at it (CUDA only). ``checkpointing``: fixed level instead
            (``"none"``/``"lean"``/``"middle"``/``"blocks"``/``"stages"``); default without a budget: ``"lean"`` on CUDA (the
            Triton lean blocks: less memory than ``"none"``, and with the CUDA graph the fastest step measured, see
            ``benchmarks/results/train_*.json``), ``"none"`` on the CPU.
        phantom_cases, phantom_size: phantom source options.
        progress: tqdm progress bars. ``threads``: torch CPU threads (None: torch's default).
        resume: continue from ``out/last.pt``.
    """

    data: str = "phantom"
    out: str = "runs/hmedn"
    model: str = "hmedn_3d_l2"
    overrides: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    slices: int = 5
    slice_axis: int = 2
    patch_size: tuple[int, ...] | None = None
    batch_size: int = 2
    epochs: int = 50
    steps_per_epoch: int = 250
    lr: float = 1e-3
    weight_decay: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "poly"
    precision: str = "auto"
    deep_supervision: bool = True
    aux_weight: float = 0.5
    grad_clip: float | None = 12.0
    val_every: int = 1
    val_fraction: float = 0.2
    max_cases: int | None = None
    foreground_prob: float = 0.33
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    checkpoint_every: int = 0
    max_nonfinite: int = 10
    memory_format: str = "auto"
    compile: bool = False
    cudnn_benchmark: bool = True
    cuda_graph: bool | None = None
    sync_bn: bool = True
    memory_budget: str | None = None
    checkpointing: str | None = None
    phantom_cases: int = 24
    phantom_size: int = 64
    progress: bool = True
    threads: int | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        if not isinstance(self.overrides, dict):
            raise TypeError(f"overrides must be a dict, got {type(self.overrides).__name__}")
        positive = ["slices", "batch_size", "epochs", "steps_per_epoch", "val_every", "phantom_cases", "phantom_size"]
        for name in positive + ["num_classes", "max_cases", "threads"]:
            value = getattr(self, name)
            if value is None and name not in positive:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_workers", "checkpoint_every", "max_nonfinite", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background included), got {self.num_classes}")
        if self.slices % 2 == 0:
            raise ValueError(f"slices must be odd, got {self.slices}")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis!r}")
        for name in ("lr", "aux_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        if not isinstance(self.weight_decay, (int, float)) or not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a positive number or None, got {self.grad_clip!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {self.memory_format!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not 0.0 <= self.foreground_prob <= 1.0:
            raise ValueError(f"foreground_prob must be in [0, 1], got {self.foreground_prob!r}")
        if self.checkpointing is not None and self.checkpointing not in memory.LEVELS:
            raise ValueError(f"checkpointing must be one of {memory.LEVELS} or None, got {self.checkpointing!r}")
        if self.cuda_graph is not None and not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True, False or None (automatic), got {self.cuda_graph!r}")
        if self.cuda_graph and self.compile:
            raise ValueError("cuda_graph and compile exclude each other (torch.compile has its own CUDA graphs: "
                             "mode='reduce-overhead')")
        if self.cuda_graph and self.precision == "fp16":
            raise ValueError("cuda_graph supports precision fp32 / bf16 / auto (fp16's gradient scaler keeps host "
                             "state between steps)")
        if self.memory_budget is not None and self.checkpointing is not None:
            raise ValueError("give memory_budget (planned checkpointing) or checkpointing (fixed), not both")
        if self.patch_size is not None:
            self.patch_size = tuple(self.patch_size)
        self.betas = tuple(self.betas)
        self.out = str(self.out)
        self.data = str(self.data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def automatic_cuda_graph(cfg: TrainConfig, device: torch.device, world_size: int, precision: str) -> bool:
    """``cfg.cuda_graph`` resolved: the option when given, else whether the step can replay a CUDA graph here
    (one process on a CUDA device, ``precision`` (resolved) fp32 / bf16, no ``compile``)."""
    if cfg.cuda_graph is not None:
        return cfg.cuda_graph
    return device.type == "cuda" and world_size == 1 and precision != "fp16" and not cfg.compile


def default_checkpointing(device: torch.device) -> str:
    """The checkpointing level without a ``checkpointing`` option or memory budget: ``"lean"`` on CUDA (the
    Triton lean blocks), ``"none"`` elsewhere."""
    return "lean" if device.type == "cuda" else "none"


def option_default(name: str) -> Any:
    """The default of TrainConfig option ``name``."""
    f = {f.name: f for f in fields(TrainConfig)}[name]
    return f.default_factory() if f.default is MISSING else f.default


__all__ = ["MEMORY_FORMATS", "PRECISIONS", "RESUMABLE_CHANGES", "SCHEDULES", "TrainConfig", "automatic_cuda_graph",
           "default_checkpointing", "option_default"]
