"""Memory planner for training under a memory budget, and activation checkpointing of a live model.

``plan_memory`` picks, in this order of preference, the first configuration whose *measured* peak memory of a
training step fits ``budget * (1 - headroom)``:

1. the requested patch and batch size with each checkpointing level, cheapest first (``"none"``, ``"lean"``,
   ``"middle"``, ``"blocks"``, ``"stages"``): checkpointing costs recomputation, so it is used only when needed;
2. with the most memory-saving level, the batch halved down to 1;
3. then the patch shrunk, largest axis first, by ``multiple`` voxels down to ``min_size``.

A trial that raises ``torch.OutOfMemoryError`` counts as not fitting. The measurement is a callable
``measure(level, patch_size, batch_size) -> peak bytes`` (:func:`cuda_step_measurer` runs real forward +
backward + optimizer steps on the GPU; tests pass a model of it), so the decision logic is testable on the CPU.
No configuration fitting raises ValueError with every trial listed.

During training an out-of-memory error escalates to the next level (:class:`OOMEscalator`) and the step is
retried. Levels are applied to a live model by :func:`set_checkpointing` (parameters and state dict untouched):

- ``"none"``: plain autograd everywhere;
- ``"lean"``: the HR pathways' memory-lean residual blocks (:mod:`hmedn_fast.nn.lean`: block input and conv
  outputs kept, norm + ReLU recomputed; dense fusion without a kept concatenation) and the memory-lean dense
  blocks (:mod:`hmedn_fast.nn.dense_lean`: one shared feature buffer, norm + ReLU recomputed; no convolution
  is recomputed at this level);
- ``"middle"``: "lean", with the HR pathways' blocks keeping their input and second conv output only (the first
  convolution recomputed in backward: one activation per block less than "lean" for one more convolution each);
- ``"blocks"``: the HR pathways keep only block inputs (convolutions recomputed); the dense blocks of the
  distilling pathway stay memory-lean where they can (BatchNorm), the others run under ``torch.utils.checkpoint``
  (non-reentrant; the recomputation in backward leaves the BatchNorm running statistics alone, so they are
  updated once per step as without checkpointing). A lean dense block keeps only its output (which the next layer
  keeps anyway) and C floats per layer, so checkpointing it saves nothing, while recomputing an eager dense block
  in backward allocates its concatenations again: with every dense block checkpointed, this level's measured
  peak was above the lean level's (H200, ``benchmarks/results/train_nvidia_h200.json``: 3975 vs 3734 MiB), so an
  out-of-memory escalation from "lean" could not help;
- ``"stages"``: "blocks", and the distilling pathway's first ``STAGES_RECOMPUTED`` encoder stages (stem, dense
  block and transition; :attr:`hmedn_fast.nn.pathways.DistillingPathway.recompute_stages`) keep only their input
  and are recomputed in backward: their dense buffers and the stem's and transitions' conv outputs (hmedn_3d_l2 at
  128^3: 80 + 16 + 16 full-resolution channels, and the second stage's ~70 MiB) are not held while the decoder's
  full-resolution block runs backward, where the lean step peaks (``docs/decisions/train.md``, stop 19); the HR
  pathway likewise (:attr:`~hmedn_fast.nn.pathways.DistillingPathway.recompute_hr`: hmedn_3d_l2's nine blocks
  keep their inputs at half resolution otherwise, ~220 MiB at 128^3 in bf16); and the full-resolution dense blocks
  take each layer's input in groups of channels in backward (:attr:`hmedn_fast.nn.blocks.DenseBlock.group_channels`:
  ``STAGES_GROUP_CHANNELS`` for the decoder's, ``STAGES_ENCODER_GROUP_CHANNELS`` for the encoder's, None: whole
  layers). On CUDA the first ``STAGES_PARKED`` encoder stages, and the HR pathway when ``STAGES_PARK_HR``, are not
  recomputed: what they save for backward waits in pinned host memory instead
  (:attr:`~hmedn_fast.nn.pathways.DistillingPathway.park_stages`, :mod:`hmedn_fast.nn.offload`).

Every level gives the same gradients; only memory and time differ.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from hmedn_fast.nn.blocks import DenseBlock
from hmedn_fast.nn.dense_lean import supported as lean_dense_supported
from hmedn_fast.nn.pathways import DistillingPathway, HRPathway
from hmedn_fast.nn.recompute import recomputed

LEVELS = ("none", "lean", "middle", "blocks", "stages")
# "stages": the full-resolution decoder dense block's backward takes at most this many input channels of a layer at
# once (hmedn_3d_l2 at 128^3: 192 MiB temporaries instead of up to 320 MiB for its last layer; with the HR pathway
# parked, 48 gives the same step peak as 32 in less time: benchmarks/results/train_stages_ab_nvidia_h200_s25d.json)
STAGES_GROUP_CHANNELS = 48
STAGES_ENCODER_GROUP_CHANNELS = None  # the encoder's block: its backward runs last, with less held
# "stages": this many encoder stages (from full resolution) keep only their input and run again in backward
STAGES_RECOMPUTED = 2
# "stages" on CUDA: this many encoder stages (from the first), and the HR pathway when STAGES_PARK_HR, park what they
# save in pinned host memory instead of being recomputed
STAGES_PARKED = 1
STAGES_PARK_HR = True
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

Measure = Callable[[str, tuple[int, ...], int], int]


def parse_memory_budget(budget: str | float | int, total_bytes: int | None = None) -> int:
    """Bytes of a budget given as ``"8GiB"`` / ``"512MB"`` / ``"1e9"`` / an int (bytes), or as a fraction of
    ``total_bytes`` (``"0.5"``, ``0.5``, ``"50%"``).

    Raises:
        ValueError: unparsable, non-positive, or a fraction without ``total_bytes`` (e.g. on the CPU).
    """
    text = str(budget).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(%|[kmgt]i?b|b)?", text)
    if m is None or isinstance(budget, bool):
        raise ValueError(f"memory budget must look like '8GiB', '512MB', '0.5' (fraction) or '50%', got {budget!r}")
    value, unit = float(m.group(1)), m.group(2) or ""
    fraction = unit == "%" or (unit == "" and value <= 1.0)
    if fraction:
        value = value / 100.0 if unit == "%" else value
        if not 0.0 < value <= 1.0:
            raise ValueError(f"memory budget fraction must be in (0, 1], got {budget!r}")
        if total_bytes is None:
            raise ValueError(f"memory budget {budget!r} is a fraction of device memory, which needs a CUDA device")
        return int(value * total_bytes)
    if value <= 0:
        raise ValueError(f"memory budget must be positive, got {budget!r}")
    return int(value * _UNITS[unit])


@dataclass
class MemoryPlan:
    """What the planner chose: checkpointing ``level``, ``patch_size``, ``batch_size``, the measured
    ``peak_bytes`` of that configuration, the ``budget_bytes`` and every ``trials`` entry
    ``{"level", "patch_size", "batch_size", "peak_bytes" (None = out of memory)}``."""

    level: str
    patch_size: tuple[int, ...]
    batch_size: int
    peak_bytes: int
    budget_bytes: int
    trials: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        return (f"memory plan: checkpointing={self.level}, patch={list(self.patch_size)}, batch={self.batch_size}, "
                f"measured peak {self.peak_bytes / 2**30:.2f} GiB of a {self.budget_bytes / 2**30:.2f} GiB budget "
                f"({len(self.trials)} trial step(s))")


def _smaller_patches(patch: tuple[int, ...], multiple: int, min_size: int):
    patch = list(patch)
    while True:
        axis = max(range(len(patch)), key=lambda a: patch[a])
        if patch[axis] - multiple < min_size:
            return
        patch[axis] -= multiple
        yield tuple(patch)


def plan_memory(budget_bytes: int, patch_size: Sequence[int], batch_size: int, measure: Measure,
                levels: Sequence[str] = LEVELS, multiple: int = 16, min_size: int = 16,
                headroom: float = 0.1, progress: bool = False) -> MemoryPlan:
    """Choose checkpointing level, batch and patch size under ``budget_bytes`` (see the module doc).

    Args:
        budget_bytes: the budget (> 0).
        patch_size: requested patch, one int per spatial axis.
        batch_size: requested batch (>= 1).
        measure: ``measure(level, patch_size, batch_size)`` -> peak bytes of a training step (may raise
            ``torch.OutOfMemoryError``).
        levels: checkpointing levels, least memory-saving first.
        multiple, min_size: patch shrinking step and lower bound per axis.
        headroom: fraction of the budget kept free for allocator fragmentation.
        progress: a progress bar on stderr, one tick per trial step measured (a trial's first step of a shape
            times kernels: seconds each at 3D training sizes).
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive int, got {budget_bytes!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not levels:
        raise ValueError("levels must name at least one checkpointing level")
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}")
    limit = budget_bytes * (1.0 - headroom)
    patch = tuple(int(p) for p in patch_size)
    trials: list[dict] = []

    bar = tqdm(desc=f"memory plan ({budget_bytes / 2**30:.2f} GiB budget)", unit="trial", disable=not progress,
               leave=False)

    def fits(level: str, p: tuple[int, ...], b: int) -> MemoryPlan | None:
        trial = f"{level} {'x'.join(map(str, p))} batch {b}"
        bar.set_postfix_str(trial)
        try:
            peak = int(measure(level, p, b))
        except torch.OutOfMemoryError:
            peak = None
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        trials.append({"level": level, "patch_size": list(p), "batch_size": b, "peak_bytes": peak})
        bar.update()
        bar.set_postfix_str(f"{trial}: " + ("out of memory" if peak is None else f"{peak / 2**30:.2f} GiB"))
        if peak is not None and peak <= limit:
            return MemoryPlan(level, p, b, peak, budget_bytes, trials)
        return None

    with bar:
        for level in levels:
            if plan := fits(level, patch, batch_size):
                return plan
        leanest = levels[-1]
        b = batch_size
        while b > 1:
            b = max(b // 2, 1)
            if plan := fits(leanest, patch, b):
                return plan
        for p in _smaller_patches(patch, multiple, min_size):
            if plan := fits(leanest, p, b):
                return plan
    raise ValueError(f"no configuration fits the memory budget of {budget_bytes / 2**30:.2f} GiB "
                     f"(with {headroom:.0%} headroom); trials: {trials}")


class OOMEscalator:
    """Next checkpointing level after an out-of-memory error: ``escalate()`` returns it and makes it current,
    or returns None when the leanest level is already in use."""

    def __init__(self, current: str = "none", levels: Sequence[str] = LEVELS) -> None:
        if current not in levels:
            raise ValueError(f"current must be one of {tuple(levels)}, got {current!r}")
        self.levels, self.current = tuple(levels), current

    def escalate(self) -> str | None:
        i = self.levels.index(self.current)
        if i + 1 >= len(self.levels):
            return None
        self.current = self.levels[i + 1]
        return self.current


def _checkpointed_forward(module: nn.Module, forward: Callable) -> Callable:
    def run(*args, **kwargs):
        if torch.is_grad_enabled() and module.training:
            return recomputed(lambda *a: forward(*a, **kwargs), (module,), *args)
        return forward(*args, **kwargs)
    return run


def _at_least(level: str, other: str) -> bool:
    """Whether ``level`` saves at least what ``other`` saves (each level does what the previous ones do)."""
    return LEVELS.index(level) >= LEVELS.index(other)


def set_checkpointing(model: nn.Module, level: str) -> int:
    """Apply checkpointing ``level`` (see the module doc) to every HR pathway and dense block of a live
    ``model``. Returns the number of modules whose mode was set."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    count = 0
    for m in model.modules():
        if isinstance(m, HRPathway):
            m.checkpoint = "blocks" if _at_least(level, "blocks") else level
            count += 1
        elif isinstance(m, DistillingPathway):
            m.recompute_stages = STAGES_RECOMPUTED if _at_least(level, "stages") else 0
            m.recompute_hr = _at_least(level, "stages")
            m.park_stages = STAGES_PARKED if _at_least(level, "stages") else 0
            m.park_hr = STAGES_PARK_HR and _at_least(level, "stages")
            for stage, groups in ((m.enc[0], STAGES_ENCODER_GROUP_CHANNELS), (m.dec[0], STAGES_GROUP_CHANNELS)):
                stage[0].group_channels = groups if _at_least(level, "stages") else None  # full-resolution blocks
            count += 1
        elif isinstance(m, DenseBlock):
            m.__dict__.pop("forward", None)  # back to the class's forward
            m.lean = level != "none"
            if _at_least(level, "blocks") and not lean_dense_supported(m):
                m.forward = _checkpointed_forward(m, m.forward)
            count += 1
    return count


def cuda_step_measurer(build: Callable[[str], nn.Module], loss_fn: Callable, in_channels: int, num_classes: int,
                       device: torch.device, autocast_dtype: torch.dtype | None,
                       memory_format: torch.memory_format = torch.contiguous_format, steps: int = 2) -> Measure:
    """A ``measure`` for :func:`plan_memory` that runs ``steps`` (>= 2) real training steps (random input and
    labels, AdamW, autocast when ``autocast_dtype`` is set, model and input in ``memory_format``) of
    ``build(level)`` on a CUDA ``device`` and returns ``torch.cuda.max_memory_allocated`` over the last one.
    The earlier steps are warm-up: the first step of a shape times candidate kernels (``cudnn.benchmark``'s
    algorithms, :mod:`hmedn_fast.ops.measured`'s Triton-or-cuDNN choices), allocating outputs and workspaces
    that the training steps, which reuse those per-process choices, never hold."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2 (warm-up steps, then the measured one), got {steps!r}")

    def measure(level: str, patch: tuple[int, ...], batch: int) -> int:
        model = build(level).to(device, memory_format=memory_format).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:  # nothing of one step lives into the next
            x = torch.randn(batch, in_channels, *patch, device=device).contiguous(memory_format=memory_format)
            y = torch.randint(0, num_classes, (batch, *patch), device=device, dtype=torch.uint8)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = model(x)
            loss_fn(out, y).total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            for _ in range(steps - 1):
                step(model, opt)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(model, opt)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device))
        finally:
            del model, opt
    return measure

