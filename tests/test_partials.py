"""``sum_partials`` / ``sum_rows`` (hmedn_fast.ops.partials, hmedn_fast.ops.triton.rowsum): the fixed-order column
sums of float32 partials against float64 sums (row counts below, at and above the row tile, column counts off the
column tile, more dims, permuted outputs, poisoned outputs), bitwise repeatable, torch's sum where Triton does not
run, bad input.
Interpreted tests run in a TRITON_INTERPRET=1 subprocess; the GPU one is marked ``cuda``."""
from __future__ import annotations

import pytest
import torch

from hmedn_fast.ops.partials import sum_partials


@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


def _check(part: torch.Tensor, perm=None) -> None:
    got = sum_partials(part, perm)
    want, absolute = part.double().sum(0), part.double().abs().sum(0)
    if perm is not None:
        want, absolute = want.permute(*perm), absolute.permute(*perm)
    assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous() and torch.isfinite(got).all()
    # float32 sums of R terms: within R roundings of the absolute sum
    bound = part.shape[0] * 2.0 ** -24 * absolute
    assert ((got.double() - want).abs() <= bound + 1e-30).all()
    assert torch.equal(got, sum_partials(part, perm))  # the same order every call


@pytest.mark.interpreted
@pytest.mark.parametrize("shape", [(1, 7), (5, 64), (64, 65), (97, 3, 33), (130, 2, 5, 7)])
def test_sum_rows_matches_float64(monkeypatch, shape):
    from hmedn_fast.ops.triton import rowsum

    real_empty = torch.empty
    monkeypatch.setattr(rowsum.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    _check(torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))))


@pytest.mark.interpreted
@pytest.mark.parametrize("shape, perm", [((5, 27, 8, 8), (1, 2, 0)), ((70, 3, 4, 5), (2, 1, 0)),
                                         ((3, 6, 7), (1, 0)), ((2, 9), (0,)), ((4, 3, 5, 2), (0, 1, 2))])
def test_sum_rows_writes_the_permuted_sum(monkeypatch, shape, perm):
    """The weight-gradient layouts ((tap, out, in) -> (out, in, tap); (tap, in, out) -> (out, in, tap)) and others,
    every element of the poisoned output written."""
    from hmedn_fast.ops.triton import rowsum

    real_empty = torch.empty
    monkeypatch.setattr(rowsum.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    _check(torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))), perm)


@pytest.mark.interpreted
def test_sum_rows_rejects_what_it_cannot_sum():
    from hmedn_fast.ops.triton.rowsum import sum_rows

    with pytest.raises(ValueError, match="part must be a contiguous float32"):
        sum_rows(torch.ones(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="part must be a contiguous float32"):
        sum_rows(torch.ones(4, 6)[:, ::2])
    with pytest.raises(ValueError, match="at least one row"):
        sum_rows(torch.ones(0, 3))
    with pytest.raises(ValueError, match="perm must be a permutation"):
        sum_rows(torch.ones(2, 3, 4), (0, 0))
    with pytest.raises(ValueError, match="perm must be a permutation"):
        sum_rows(torch.ones(2, 1, 2, 3, 4), (3, 2, 1, 0))


@pytest.mark.not_interpreted
def test_without_triton_it_is_torch_sum():
    part = torch.randn(9, 4, 5)
    assert torch.equal(sum_partials(part), part.sum(0))
    got = sum_partials(part, (1, 0))
    assert got.is_contiguous() and torch.equal(got, part.sum(0).t())


@pytest.mark.cuda
@pytest.mark.parametrize("shape, perm", [((88, 27, 32, 32), None), ((88, 27, 32, 32), (1, 2, 0)),
                                         ((88, 27, 16, 32), (2, 1, 0)), ((264, 32, 33), None), ((3, 1000), None)])
def test_cuda_sum_rows_matches_float64(shape, perm):
    _check(torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)), perm)
