"""Training: :class:`Trainer` / :class:`TrainConfig` (``hmedn train``), checkpoints with exact resume, the
memory planner and data-parallel (torchrun) support."""
from __future__ import annotations

from .memory import MemoryPlan, parse_memory_budget, plan_memory
from .config import TrainConfig
from .trainer import NonFiniteLossError, Trainer

__all__ = ["MemoryPlan", "NonFiniteLossError", "TrainConfig", "Trainer", "parse_memory_budget", "plan_memory"]
