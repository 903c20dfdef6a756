"""hmedn_fast.nn.layers.MaxPool: nn.MaxPool2d/3d(2) whose backward keeps only the indices."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hmedn_fast.nn.layers import MaxPool, max_pool
from _live_bytes import LiveBytes


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (2, 3, 7, 9), (1, 4, 6, 8, 4), (2, 3, 7, 9, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_torch_max_pool_float64(shape, channels_last):
    """Outputs, input gradients (odd sizes drop the last row as torch does) and the gradient's layout equal
    torch's pooling, for both layouts."""
    g = torch.Generator().manual_seed(len(shape) + channels_last)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    ref = (nn.MaxPool2d(2) if x.ndim == 4 else nn.MaxPool3d(2))
    ours = max_pool(x.ndim - 2)
    assert isinstance(ours, MaxPool)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = ref(a), ours(b)
    gy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want.backward(gy)
    got.backward(gy)
    assert torch.equal(got, want) and got.stride() == want.stride()
    assert torch.equal(b.grad, a.grad) and b.grad.stride() == a.grad.stride()


def test_gradcheck():
    x = torch.randn(1, 2, 4, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(MaxPool(3), (x,))


def test_backward_keeps_only_the_indices():
    """What the pooling keeps for backward, counted with saved-tensor hooks: torch's keeps the input and int64
    indices, ours one byte per output element (the argmax's offset in its window); and the input, once the caller
    drops it, is freed before the backward (weak reference)."""
    import weakref

    def saved(pool):
        sizes = []
        x = torch.randn(2, 4, 8, 8, 8, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.nbytes) or t, lambda t: t):
            y = pool(x * 1.0)
        return sizes, y

    ours, y = saved(MaxPool(3))
    theirs, _ = saved(nn.MaxPool3d(2))
    indices = y.numel() * 8
    assert ours == [y.numel()] and sorted(theirs) == sorted([indices, 2 * 4 * 8**3 * 4])
    h = torch.randn(2, 4, 8, 8, 8, requires_grad=True) * 1.0
    ref = weakref.ref(h)
    y = MaxPool(3)(h)
    del h
    assert ref() is None
    y.sum().backward()


def test_live_bytes_at_backward_lower_by_the_input():
    """The pooled input (made inside the graph) stays alive until the pooling's backward with torch's pooling and
    not with ours: the backward's peak of live bytes before the pooling's own backward is lower by its size."""
    x = torch.randn(1, 4, 16, 16, 16, requires_grad=True)
    peaks = {}
    for name, pool in (("torch", nn.MaxPool3d(2)), ("ours", MaxPool(3))):
        with LiveBytes() as m:
            y = pool(x * 2.0)  # the scaled input: saved by nothing but the pooling
            z = (y * y).sum()
        peaks[name] = m.live
        z.backward()
    assert peaks["torch"] - peaks["ours"] >= 4 * 16**3 * 4


def test_no_grad_and_eval_use_plain_pooling():
    x = torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(MaxPool(2)(x), F.max_pool2d(x, 2))


@pytest.mark.parametrize("dims, shape", [(2, (1, 2, 4, 4, 4)), (3, (1, 2, 4, 4))])
def test_wrong_rank_raises(dims, shape):
    with pytest.raises(ValueError, match="spatial axes"):
        MaxPool(dims)(torch.randn(shape))


def test_bad_spatial_dims_raises():
    with pytest.raises(ValueError, match="spatial_dims"):
        MaxPool(1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_torch_max_pool(dtype):
    """On the GPU (channels-last bf16 as the trainer runs it, and float32): outputs and gradients bitwise torch's."""
    x = torch.randn(2, 16, 33, 32, 30, device="cuda", dtype=dtype).to(memory_format=torch.channels_last_3d)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = nn.MaxPool3d(2)(a), MaxPool(3)(b)
    gy = torch.randn_like(want)
    want.backward(gy)
    got.backward(gy)
    assert torch.equal(got, want) and torch.equal(b.grad, a.grad) and b.grad.stride() == a.grad.stride()
