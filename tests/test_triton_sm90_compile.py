"""The Triton kernels compile for sm_90 (Hopper) on a machine without a GPU: this catches, in CPU CI, what the
interpreter runs but the GPU compiler rejects (e.g. a ``continue`` in a kernel loop) before a GPU session finds it.
Every distinct launch (kernel, argument types, constexprs, warps, stages) that the package's Triton ops make on
small inputs, recorded in a TRITON_INTERPRET=1 subprocess (``tests/_triton_launch_recorder.py``; the convolutions
at every launch-configuration class of hmedn_3d_l2). Compiled by the installed Triton (the GPU hosts run 3.6)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.not_interpreted


def _compile_sm90(kernel, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    """Compile ``kernel`` for sm_90: ``types`` of its runtime arguments (default i32), ``constexprs`` by name."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - a Triton without this API
        pytest.skip(f"this Triton cannot compile ahead of time here ({exc})")
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    assert len(compiled.asm["cubin"]) > 0


def test_every_recorded_triton_launch_compiles_for_sm90(tmp_path):
    import triton.language as tl

    out = tmp_path / "launches.json"
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("_triton_launch_recorder.py")), str(out)],
                          env=dict(os.environ, TRITON_INTERPRET="1"), cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    specs = json.loads(out.read_text())
    kernels = {s["kernel"] for s in specs}
    assert {"_fwd_kernel", "_wgrad_kernel", "_forward_kernel", "_backward_kernel", "_reduce_kernel", "_loss_kernel",
            "_axis_adjoint_kernel"} <= kernels, kernels
    failures = []
    for spec in specs:
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        constexprs = {k: tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v for k, v in spec["constexprs"].items()}
        types = {k: v for k, v in spec["signature"].items() if v != "constexpr"}
        try:
            _compile_sm90(kernel, types, constexprs, spec["options"].get("num_warps", 4),
                          spec["options"].get("num_stages", 3))
        except Exception as exc:  # noqa: BLE001 - every failing launch is reported below
            failures.append(f"{spec['kernel']} {spec['constexprs']}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)
