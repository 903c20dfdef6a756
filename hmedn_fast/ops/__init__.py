"""Fast ops of hmedn_fast: one public function per op, dispatching to Triton / compiled / reference backends."""
from __future__ import annotations

from hmedn_fast.ops.loss import difficulty_guided_loss

__all__ = ["difficulty_guided_loss"]
