"""Low-overhead repeat launches of a Triton kernel.

``kernel[grid](*args, **constexprs)`` costs tens of microseconds of host time per call on the GPU machines
(binding ~40 arguments, computing their specialisation and the cache key, then launching): more than the
fused loss's GPU time at training sizes. :class:`FastLauncher` does the first launch of each specialisation
through Triton (which compiles it and returns the compiled kernel), remembers the compiled kernel under a
key that captures everything Triton specialises on, and later calls the compiled kernel's launcher directly.

Key per argument (a superset of Triton's specialisation, so two calls with one key always run one binary):
tensors: dtype and 16-byte alignment of the data pointer (plus, once per launch, the device index of the first
tensor, which the launch also makes current: one launch's tensors share a device); ints: value 1 or not, divisibility
by 16, and 32- or 64-bit range; bools, None and constexprs: their value; floats: only their type. The key is
computed by the compiled extension when it is built (``csrc/launch_key.cpp``: ~0.5 us for 38 arguments on the
development CPU, the Python loop ~13 us), which also hands CUDA tensors to Triton's launcher as data-pointer ints.
On the CPU (``TRITON_INTERPRET=1``) or whenever ``FastLauncher.enabled`` is False it is a plain launch. Either
way a launch runs with the tensors' device current (Triton loads and launches on the current device), so the
ops work on any GPU of a machine, as PyTorch ops do.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch

from hmedn_fast.ops._ext import extension

try:  # Triton >= 3.4; with an older one FastLauncher falls back to kernel[grid] (see __call__)
    from triton import knobs
    from triton.runtime import driver
except ImportError:
    knobs = driver = None

_INT32 = (-(2**31), 2**31 - 1)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton does at import


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (``triton.cdiv`` costs ~2 us of host time per call outside kernels)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), like ``triton.next_power_of_2`` without its call overhead."""
    return 1 << (n - 1).bit_length()


@functools.cache
def multiprocessors(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (cached: the launches ask on every call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _python_args_key(args: tuple) -> tuple[tuple, tuple]:
    """(key, launch arguments): one key entry per kernel argument (see the module docstring), and the arguments
    with every CUDA tensor replaced by its data pointer (an int), which Triton's launcher takes as it is (for a
    tensor it calls ``data_ptr()`` through Python and asks the driver about the pointer again). The reference of
    the compiled extension's ``launch_key`` (``csrc/launch_key.cpp``; ~12 us less host time per launch of 38
    arguments on the development CPU and on an H200 host), used without the extension."""
    out = []
    add = out.append
    run_args = list(args)
    for i, a in enumerate(args):
        t = type(a)
        if t is int:
            add((a == 1, not a & 15, _INT32[0] <= a <= _INT32[1]))
        elif t is float:
            add(float)
        elif t is bool or a is None:
            add(a)
        elif isinstance(a, torch.Tensor):
            ptr = a.data_ptr()
            add((a.dtype, not ptr & 15))
            if a.is_cuda:  # anything else stays a tensor, for Triton's own error ("cpu tensor?")
                run_args[i] = ptr
        else:
            raise TypeError(f"FastLauncher: unsupported kernel argument type {t.__name__}")
    return tuple(out), tuple(run_args)


_args_key = getattr(extension(), "launch_key", None) or _python_args_key


def native_launch_info(kernel: Any) -> tuple[int, int, int, str]:
    """``(CUfunction handle, threads per block, dynamic shared memory in bytes, parameter codes)`` of a compiled and
    launched Triton kernel, for direct launches from C++ (``csrc/fused_loss.cpp``). Codes: one letter per runtime
    parameter in order ("p" pointer, "i" int32, "l" int64, "f" fp32; constexprs, ints equal to 1 among them, are no
    parameters); "" when the kernel needs more than a plain ``cuLaunchKernel`` (thread-block clusters, cooperative or
    programmatic-dependent launches, scratch memory, over 227 KiB of shared memory) or takes other parameter types."""
    meta = kernel.metadata
    plain = (getattr(meta, "num_ctas", 1) == 1 and not getattr(meta, "launch_cooperative_grid", False)
             and not getattr(meta, "launch_pdl", False) and not getattr(meta, "global_scratch_size", 0)
             and not getattr(meta, "profile_scratch_size", 0) and meta.shared <= 227 * 1024)
    codes = []
    for ty in kernel.src.signature.values():
        if ty == "constexpr":
            continue
        code = "p" if isinstance(ty, str) and ty.startswith("*") else _PARAM_CODES.get(ty)
        if code is None:
            plain = False
            break
        codes.append(code)
    return kernel.function, 32 * meta.num_warps, meta.shared, "".join(codes) if plain else ""


_PARAM_CODES = {"i32": "i", "i64": "l", "fp32": "f"}


class FastLauncher:
    """``FastLauncher(jit_fn)(grid, *args, **constexprs)`` launches ``jit_fn[grid](*args, **constexprs)``.

    ``args`` are the kernel's leading runtime arguments in order, ``constexprs`` its remaining
    (``tl.constexpr`` and launch option) arguments by name, e.g. ``num_warps``. Launch options are part of the
    key like the constexprs.
    """

    enabled = True  # class-wide switch (benchmarks compare both paths)

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.cache: dict[tuple, tuple[Any, tuple]] = {}

    def __call__(self, grid: tuple[int, ...], *args: Any, **constexprs: Any) -> None:
        if INTERPRET:
            self.fn[grid](*args, **constexprs)
            return
        device = next((a.get_device() for a in args if isinstance(a, torch.Tensor)), -1)  # one launch, one device
        if device >= 0 and device != torch._C._cuda_getDevice():
            # Triton loads and launches kernels on the current device: make it the tensors' (e.g. cuda:1)
            with torch.cuda.device(device):
                self._launch(device, grid, args, constexprs)
        else:
            self._launch(device, grid, args, constexprs)

    def _launch(self, device: int, grid: tuple[int, ...], args: tuple, constexprs: dict[str, Any]) -> None:
        if not FastLauncher.enabled:
            self.fn[grid](*args, **constexprs)
            return
        arg_key, run_args = _args_key(args)
        key = (device, arg_key, tuple(constexprs.items()))
        hit = self.cache.get(key)
        if hit is None:
            kernel = self.fn[grid](*args, **constexprs)  # compiles (once per specialisation) and launches
            self.cache[key] = (kernel, tuple(constexprs[n] for n in self.fn.arg_names[len(args):]))
            return
        kernel, tail = hit
        try:
            self._run(kernel, grid, (*run_args, *tail), device)
        except (TypeError, AttributeError, ImportError) as err:  # a Triton whose launcher API differs
            FastLauncher.enabled = False
            warnings.warn(f"hmedn_fast: direct Triton launches disabled ({err!r}); using kernel[grid](...)")
            self.fn[grid](*args, **constexprs)

    @staticmethod
    def _run(kernel: Any, grid: tuple[int, ...], full: tuple, device: int) -> None:
        """What ``JITFunction.run`` does after its cache lookup (Triton 3.3 and later), on the current stream of
        ``device`` (the tensor arguments'). ``kernel.launch_metadata`` is only asked for when a launch-enter hook is
        set (it returns None otherwise, after binding every argument)."""
        if knobs is None:
            raise ImportError("triton.knobs (Triton >= 3.4)")
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        stream = driver.active.get_current_stream(device)
        enter_hook = knobs.runtime.launch_enter_hook
        metadata = None if enter_hook is None else kernel.launch_metadata(grid, stream, *full)
        kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, metadata, enter_hook,
                   knobs.runtime.launch_exit_hook, *full)
