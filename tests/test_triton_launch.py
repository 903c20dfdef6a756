"""FastLauncher (hmedn_fast.ops.triton.launch): its specialisation key, and on the GPU that repeat launches
through the cached compiled kernel give what ``kernel[grid](...)`` gives, across specialisations."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _simulated_gpu import SimulatedDevices, on_gpu  # noqa: E402
from hmedn_fast.ops._ext import extension  # noqa: E402
from hmedn_fast.ops.triton.launch import FastLauncher, _args_key, _python_args_key, cdiv, next_power_of_2  # noqa: E402

KEYS = {"python": _python_args_key, "cpp": getattr(extension(), "launch_key", None)}


def _key_impl(name):
    if KEYS[name] is None:
        pytest.skip("the compiled extension hmedn_fast._C is not built")
    return KEYS[name]


def test_the_compiled_key_is_used_when_built():
    assert _args_key is (KEYS["cpp"] or _python_args_key)


@pytest.mark.parametrize("impl", ["python", "cpp"])
def test_key_separates_what_triton_specialises_on(impl):
    args_key = _key_impl(impl)

    def key(args):
        return args_key(args)[0]

    x = torch.randn(64)
    assert key((x,)) != key((x.double(),))  # dtype
    assert key((x,)) != key((x[1:],))  # 16-byte alignment of the pointer
    assert key((x,)) == key((torch.randn(32),))
    assert key((1,)) != key((3,))  # value 1
    assert key((16,)) != key((17,))  # divisibility by 16
    assert key((32,)) == key((48,))
    assert key((2**31,)) != key((2**31 - 16,))  # 64-bit range
    assert key((True,)) != key((False,)) != key((None,))
    assert key((True,)) != key((1,))  # a bool is a constexpr-like flag, not an int
    assert key((-32,)) == key((16,)) != key((-17,))  # divisibility of negative ints
    assert key((0.5,)) == key((2.0,))
    with pytest.raises(TypeError, match="unsupported kernel argument"):
        key(("text",))
    with pytest.raises(TypeError, match="unsupported kernel argument"):
        key((torch.float32,))


@pytest.mark.parametrize("impl", ["python", "cpp"])
def test_launch_arguments_pass_cuda_pointers_as_ints_and_leave_the_rest(impl):
    """Triton's launcher takes an int as a pointer directly; only CUDA tensors become ints, so a CPU tensor still
    reaches Triton's own check ("cpu tensor?"), and every other argument is passed unchanged."""
    x = torch.randn(8)
    _, run = _key_impl(impl)((x, 3, 0.5, None, True))
    assert run[0] is x and run[1:] == (3, 0.5, None, True)


def test_compiled_key_separates_exactly_what_the_python_key_does():
    """Over random argument tuples (tensors of 3 dtypes at aligned and unaligned offsets, ints around 1, 16-multiples
    and the 32-bit limits, floats, bools, None), two tuples get equal compiled keys exactly when they get equal
    Python keys."""
    cpp = _key_impl("cpp")
    gen = torch.Generator().manual_seed(0)
    base = {dt: torch.randn(64).to(dt) for dt in (torch.float32, torch.bfloat16, torch.int64)}
    pool = ([t[o:] for t in base.values() for o in (0, 1, 8)]
            + [1, 0, 2, 15, 16, -16, -17, 48, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**40, 1.0, 0.5, True, False,
               None])

    def draw():
        return tuple(pool[int(i)] for i in torch.randint(len(pool), (4,), generator=gen))

    tuples = [draw() for _ in range(400)]
    py_keys = [_python_args_key(t)[0] for t in tuples]
    cpp_keys = [cpp(t)[0] for t in tuples]
    for i in range(len(tuples)):
        for j in range(i):
            assert (py_keys[i] == py_keys[j]) == (cpp_keys[i] == cpp_keys[j]), (tuples[i], tuples[j])


def test_int_helpers_match_triton():
    import triton

    for a in [1, 2, 3, 15, 16, 17, 1000, 2**31 + 5]:
        assert next_power_of_2(a) == triton.next_power_of_2(a)
        for b in [1, 2, 7, 16, 1024]:
            assert cdiv(a, b) == triton.cdiv(a, b)


@pytest.mark.not_interpreted  # the interpreter launches plainly, on the CPU
def test_launches_run_with_the_tensors_device_current(monkeypatch):
    """Triton loads and launches a kernel on the current device; a launch over tensors of another GPU (cuda:1
    while cuda:0 is current) must switch to it for the first (compiling) and the cached launches, and leave the
    current device as it was. Devices are simulated (tests/_simulated_gpu.py)."""
    devices = SimulatedDevices(monkeypatch)
    seen = []

    class FakeJit:
        arg_names = ["x", "BLOCK"]

        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                seen.append(("compile", devices.current))
                return object()
            return launch

    monkeypatch.setattr(FastLauncher, "_run", staticmethod(lambda kernel, grid, full, dev: seen.append(
        ("cached", devices.current, dev))))
    fast = FastLauncher(FakeJit())
    x = on_gpu(1)
    fast((1,), x, BLOCK=8)
    fast((1,), x, BLOCK=8)
    assert seen == [("compile", 1), ("cached", 1, 1)] and (devices.current, devices.switches) == (0, 2)
    fast((1,), on_gpu(0), BLOCK=8)
    assert seen[-1] == ("compile", 0) and devices.switches == 2  # already current: no switch


@pytest.mark.cuda
def test_repeat_launches_equal_plain_launches():
    """Scale-and-shift kernel over strided views: every specialisation (alignment, stride 1 or not, sizes
    divisible by 16 or not, dtype) launched twice through FastLauncher (compile, then cached path) equals the
    same kernel launched plainly; outputs are poisoned first."""
    import triton
    import triton.language as tl

    @triton.jit
    def axpb(x_ptr, y_ptr, n, stride, a, BLOCK: tl.constexpr, RELU: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(x_ptr + offs * stride, mask=mask).to(tl.float32) * a + 1.0
        if RELU:
            v = tl.maximum(v, 0.0)
        tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)

    fast = FastLauncher(axpb)
    base = torch.randn(4099, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        for offset in (0, 1):
            for stride in (1, 2):
                for n in (1, 1024, 1000):
                    x = base.to(dtype)[offset:offset + n * stride]
                    for relu in (False, True):
                        want = torch.full((n,), float("nan"), device="cuda", dtype=dtype)
                        axpb[(triton.cdiv(n, 256),)](x, want, n, stride, -0.5, BLOCK=256, RELU=relu)
                        for _ in range(2):
                            got = torch.full((n,), float("nan"), device="cuda", dtype=dtype)
                            fast((triton.cdiv(n, 256),), x, got, n, stride, -0.5, BLOCK=256, RELU=relu)
                            assert FastLauncher.enabled
                            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(fast.cache) > 1


@pytest.mark.cuda
def test_cached_launches_call_the_launch_enter_hook_with_metadata(monkeypatch):
    """FastLauncher skips ``launch_metadata`` only while no launch-enter hook is set (proton and other profilers
    set one): with a hook, cached launches still report the kernel's name to it."""
    import triton
    import triton.language as tl
    from triton import knobs

    @triton.jit
    def fill(y_ptr, v, BLOCK: tl.constexpr):
        tl.store(y_ptr + tl.arange(0, BLOCK), v)

    fast = FastLauncher(fill)
    y = torch.full((16,), float("nan"), device="cuda")
    fast((1,), y, 2.0, BLOCK=16)  # compiles
    names = []
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: names.append(metadata.get()["name"]))
    fast((1,), y, 3.0, BLOCK=16)  # cached path
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    assert names == ["fill"] and torch.equal(y, torch.full_like(y, 3.0))
