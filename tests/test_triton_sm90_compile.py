"""The Triton convolution kernels compile for sm_90 (Hopper) on a machine without a GPU, at the launch
configurations the dispatch uses: this catches, in CPU CI, what the interpreter runs but the GPU compiler rejects
(e.g. a ``continue`` in a kernel loop) before a GPU session finds it. Compiled by the installed Triton (the GPU
hosts run 3.6)."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.not_interpreted


def _compile_sm90(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - a Triton without this API
        pytest.skip(f"this Triton cannot compile ahead of time here ({exc})")
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    assert len(compiled.asm["cubin"]) > 0
    return compiled


@pytest.mark.parametrize("c_in, c_out", [(16, 16), (48, 16), (32, 32), (16, 80), (32, 144)])
def test_conv_forward_kernel_compiles_for_sm90(c_in, c_out):
    """The forward (C_out 16 / 32 in one block; other C_out, the input gradient's, in blocks)."""
    from hmedn_fast.ops.triton.conv_fwd import _fwd_kernel, launch_config, out_channel_block
    from hmedn_fast.ops.triton.launch import cdiv

    bm, bk, warps, stages = launch_config(c_in)
    _compile_sm90(_fwd_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16"},
                  dict(C_OUT=c_out, CO_BLOCK=out_channel_block(c_out), BM=bm, BK=bk, NCHUNK=cdiv(c_in, bk),
                       F32_DOT=False, NUM_STAGES=stages), warps, stages)


@pytest.mark.parametrize("c_in, c_out", [(16, 16), (32, 16), (64, 16), (32, 32), (160, 32)])
def test_conv_weight_gradient_kernel_compiles_for_sm90(c_in, c_out):
    from hmedn_fast.ops.triton.conv_wgrad import _wgrad_kernel, launch_config

    bv, warps, stages, _, cin_block = launch_config(c_in, c_out)
    _compile_sm90(_wgrad_kernel, {"x_ptr": "*bf16", "gy_ptr": "*bf16", "part_ptr": "*fp32"},
                  dict(C_OUT=c_out, C_IN_BLOCK=cin_block, BV=bv, F32_DOT=False), warps, stages)
