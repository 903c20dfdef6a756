"""CPU stand-ins for the measured backend choice (hmedn_fast.ops.measured) and for counting kernel calls."""
from __future__ import annotations


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that each call appends 1 to the returned list (then runs the real function)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def fake_timing(monkeypatch, kernel_calls: list, faster: str) -> list[str]:
    """Let every signature be measured on the CPU with a fake timer: a runner that added to ``kernel_calls`` (ran
    the kernel) is ``"triton"``, any other ``"reference"``; the ``faster`` one takes 1 ms, the other 2 ms. Returns
    the list the timed backends' names are appended to, in order."""
    from hmedn_fast.ops import measured

    timed: list[str] = []

    def fake_time(run, reps):
        before = len(kernel_calls)
        run()
        timed.append("triton" if len(kernel_calls) > before else "reference")
        return 1.0 if timed[-1] == faster else 2.0

    monkeypatch.setattr(measured, "can_measure", lambda *t: True)
    monkeypatch.setattr(measured, "_time_ms", fake_time)
    return timed
