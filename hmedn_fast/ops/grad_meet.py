"""Two autograd Functions that both send a gradient to one tensor can add the two in one of their own kernels instead
of leaving the sum to autograd (one more elementwise pass over the tensor): :class:`GradMeet`. The HR pathway uses it
for each block output, whose gradient comes from the next block and from its dense-fusion term."""
from __future__ import annotations

from torch import Tensor


class GradMeet:
    """Where two backward functions meet that each send a gradient to one tensor.

    Both parties :meth:`join` in forward. In backward, when both joined (:attr:`met`), the first to run leaves its
    gradient (:meth:`leave`) and returns None for the tensor; the second :meth:`take` s it, adds its own (in its
    kernel where it can) and returns the sum. Either order gives the sum; with fewer than two parties each returns
    its own gradient and autograd adds them. Make a new one for every forward.
    """

    def __init__(self) -> None:
        self.parties = 0
        self._pending: Tensor | None = None

    def join(self) -> None:
        """Register a party (in its forward)."""
        self.parties += 1

    @property
    def met(self) -> bool:
        """Whether exactly two parties joined (only then may one of them return None for the tensor)."""
        return self.parties == 2

    def take(self) -> Tensor | None:
        """The gradient the other party left, or None if it has not run yet (then :meth:`leave` yours)."""
        grad, self._pending = self._pending, None
        return grad

    def leave(self, grad: Tensor) -> None:
        """Leave ``grad`` for the other party, which returns the sum."""
        self._pending = grad

    def settle(self, grad: Tensor) -> Tensor | None:
        """What a party that cannot add in its own kernel returns for the tensor: ``grad`` when the two did not meet;
        None after leaving ``grad`` when it runs first; ``grad`` plus the other's (in place) when it runs second."""
        if not self.met:
            return grad
        other = self.take()
        if other is None:
            self.leave(grad)
            return None
        return grad.add_(other)
