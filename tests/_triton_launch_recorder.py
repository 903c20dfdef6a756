"""Run by tests/test_triton_sm90_compile.py in a TRITON_INTERPRET=1 subprocess: runs every Triton op of the package
on small CPU inputs (forced to its Triton backend) and writes, for each distinct launch, the kernel, its argument
types and its constexpr values to the JSON file named by argv[1], for the test to compile them for sm_90."""
from __future__ import annotations

import json
import sys

import torch

from hmedn_fast.ops.triton import launch

POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
           torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.uint8: "*u8", torch.bool: "*i1"}
specs: dict[str, dict] = {}
real_call = launch.FastLauncher.__call__


def encode(value):
    """A constexpr value as JSON: Triton dtypes as {"tl_dtype": name}."""
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"unexpected constexpr value {value!r}")


def record(self, grid, *args, **constexprs):
    names = self.fn.arg_names
    signature, values = {}, {}
    for name, arg in zip(names, args):
        if isinstance(arg, torch.Tensor):
            signature[name] = POINTER[arg.dtype]
        elif arg is None or isinstance(arg, bool):
            signature[name], values[name] = "constexpr", arg
        elif isinstance(arg, int):
            signature[name] = "i32" if -2**31 <= arg < 2**31 else "i64"
        elif isinstance(arg, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{self.fn.__name__}: unexpected argument {name}={arg!r}")
    options = {k: constexprs[k] for k in ("num_warps", "num_stages") if k in constexprs}
    for name, value in constexprs.items():
        if name not in options:
            signature[name], values[name] = "constexpr", encode(value)
    spec = {"module": self.fn.fn.__module__, "kernel": self.fn.__name__, "signature": signature, "constexprs": values,
            "options": options}
    specs[json.dumps(spec, sort_keys=True)] = spec
    return real_call(self, grid, *args, **constexprs)


def workloads() -> None:
    from hmedn_fast.ops.conv import conv_backward, conv_forward, conv_input_grad
    from hmedn_fast.ops.loss import difficulty_guided_loss
    from hmedn_fast.ops.norm_act import norm_act
    from hmedn_fast.ops.upsample import upsample_linear

    cl = torch.channels_last_3d
    # every launch-configuration class of hmedn_3d_l2's convolutions (forward, weight and input gradient)
    for c_in, c_out, d in [(16, 16, 1), (32, 16, 1), (48, 16, 1), (64, 16, 1), (80, 16, 1), (144, 16, 1), (32, 32, 2), (160, 32, 1)]:
        x = torch.randn(1, c_in, 3, 4, 5).bfloat16().contiguous(memory_format=cl)
        w = torch.randn(c_out, c_in, 3, 3, 3).bfloat16()
        y = conv_forward(x, w, (1,) * 3, (d,) * 3, (d,) * 3, 1, backend="triton")
        conv_backward(y, x, w, (1,) * 3, (d,) * 3, (d,) * 3, 1, False, True, backend="triton")
        conv_input_grad(y, w, x.shape, (1,) * 3, (d,) * 3, (d,) * 3, 1, backend="triton")
    for c_in, c_out, d in [(16, 16, 1), (32, 16, 1), (32, 32, 2)]:  # the box tiles (volumes >= 4 x 32 x 32)
        x = torch.randn(1, c_in, 4, 32, 32).bfloat16().contiguous(memory_format=cl)
        w = torch.randn(c_out, c_in, 3, 3, 3).bfloat16()
        y = conv_forward(x, w, (1,) * 3, (d,) * 3, (d,) * 3, 1, backend="triton")
        conv_backward(y, x, w, (1,) * 3, (d,) * 3, (d,) * 3, 1, False, True, backend="triton")
        conv_input_grad(y, w, x.shape, (1,) * 3, (d,) * 3, (d,) * 3, 1, backend="triton")
    for kind, groups in [("batch", 1), ("instance", 1), ("group", 2)]:
        for residual in (False, True):
            for relu in (True, False):
                x = torch.randn(2, 4, 3, 4, 5).contiguous(memory_format=cl).requires_grad_()
                wt, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
                r = torch.randn(2, 4, 3, 4, 5).contiguous(memory_format=cl) if residual else None
                norm_act(x, wt, b, kind, groups, residual=r, relu=relu, backend="triton").sum().backward()
    for k, dtype in [(4, torch.float32), (9, torch.bfloat16)]:
        for extras in (False, True):
            logits = torch.randn(2, k, 3, 4, 5).to(dtype).requires_grad_()
            labels = torch.randint(0, k, (2, 3, 4, 5))
            kw = dict(weight=torch.rand(2, 3, 4, 5) + 0.5, contour_logits=torch.randn(2, 1, 3, 4, 5).requires_grad_(),
                      contour_target=torch.rand(2, 3, 4, 5), class_weight=torch.rand(k) + 0.5,
                      ignore_index=0) if extras else {}
            for reduction in ("mean", "none"):
                out = difficulty_guided_loss(logits, labels, reduction=reduction, backend="triton", **kw)
                out.sum().backward()
    x = torch.randn(1, 4, 3, 4, 5).contiguous(memory_format=cl).requires_grad_()
    upsample_linear(x, (6, 8, 10), backend="triton").sum().backward()


if __name__ == "__main__":
    launch.FastLauncher.__call__ = record
    workloads()
    json.dump(list(specs.values()), open(sys.argv[1], "w"), indent=1)
