import itertools

import pytest
import torch

from hf_polyattn.modeling.power_softmax import power_softmax

POWERS = [2, 4, 6, 8]


def reference(scores: torch.Tensor, power: int, eps: float, keep: torch.Tensor, form: str) -> torch.Tensor:
    """The definition, row by row in float64, with masked keys dropped from the row."""
    out = torch.zeros_like(scores, dtype=torch.float64)
    for index in itertools.product(*map(range, scores.shape[:-1])):
        row = scores[index].double()
        kept = keep[index].bool()
        terms = row[kept] ** power
        normaliser = eps + terms.sum() if form == "sum" else kept.sum() * (eps + terms.mean())
        out[index][kept] = terms / normaliser
    return out


@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("form", ["sum", "mean"])
@pytest.mark.parametrize("stable", [True, False])
def test_matches_definition_and_ignores_masked_keys(power, form, stable):
    torch.manual_seed(power)
    scores = torch.randn(2, 3, 5, 7) * 3
    keep = torch.rand(2, 1, 5, 7) > 0.3
    keep[..., 0] = True
    weights = power_softmax(scores, power, eps=1e-3, mask=keep, form=form, stable_scaling=stable)
    expected = reference(scores, power, 1e-3, keep.expand_as(scores), form)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-7)
    assert (weights >= 0).all()
    assert (weights[~keep.expand_as(weights)] == 0).all()
    # Whatever the masked scores hold (huge, nan-free), the kept weights do not move.
    poisoned = torch.where(keep, scores, torch.full_like(scores, 1e4))
    assert torch.equal(power_softmax(poisoned, power, 1e-3, keep, form, stable), weights)


@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("form", ["sum", "mean"])
def test_rows_sum_to_documented_constant(power, form):
    torch.manual_seed(0)
    scores = torch.randn(4, 9, 9)
    keep = torch.ones(9, 9).tril().bool()
    eps = 0.05
    weights = power_softmax(scores, power, eps=eps, mask=keep, form=form).double()
    terms = scores.double() ** power * keep
    length = keep.sum(-1)
    s = terms.sum(-1) if form == "sum" else terms.sum(-1) / length
    torch.testing.assert_close(weights.sum(-1), s / (eps + s))
    exact = power_softmax(scores, power, eps=0.0, mask=keep, form=form).double()
    torch.testing.assert_close(exact.sum(-1), torch.ones(4, 9, dtype=torch.float64))


@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e3])
def test_invariant_to_positive_scaling(power, scale):
    torch.manual_seed(1)
    scores = torch.randn(3, 6, 6)
    base = power_softmax(scores, power, eps=0.0)
    torch.testing.assert_close(power_softmax(scores * scale, power, eps=0.0), base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_scores_stay_finite(power, dtype):
    scores = (torch.rand(2, 4, 16, 16) * 2 - 1) * 1e4
    scores[..., 3] = 1e4
    keep = torch.ones(16, 16).tril().bool()
    weights = power_softmax(scores.to(dtype), power, eps=1e-6, mask=keep)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 16), rtol=1e-3, atol=1e-3)


def test_stable_scaling_is_the_same_function():
    torch.manual_seed(2)
    scores = torch.randn(2, 8, 8, dtype=torch.float64) * 4
    keep = torch.ones(8, 8).tril().bool()
    for eps in (0.0, 1e-2, 10.0):
        torch.testing.assert_close(
            power_softmax(scores, 4, eps, keep, stable_scaling=True),
            power_softmax(scores, 4, eps, keep, stable_scaling=False),
        )


def test_fully_masked_row_is_zero_not_nan():
    scores = torch.randn(1, 3, 4)
    keep = torch.tensor([[False] * 4, [True, False, False, False], [True] * 4])
    weights = power_softmax(scores, 4, eps=0.0, mask=keep)
    assert torch.equal(weights[0, 0], torch.zeros(4))
    assert torch.isfinite(weights).all()


def test_gradients_flow_and_are_finite():
    scores = (torch.randn(2, 5, 5) * 100).requires_grad_()
    keep = torch.ones(5, 5).tril().bool()
    (power_softmax(scores, 6, 1e-6, keep) * torch.randn(2, 5, 5)).sum().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


@pytest.mark.parametrize("power", [0, 3, -2])
def test_bad_power_raises(power):
    with pytest.raises(ValueError, match="power"):
        power_softmax(torch.randn(2, 2), power)


@pytest.mark.parametrize("power", [6, 8])
def test_large_masked_scores_do_not_poison_the_row(power):
    # The kept keys score ~1e-6 and a masked (future) key scores 20: scaled by the kept max, the
    # masked score's power overflows to inf, and inf · 0 was NaN (it made p=8 training diverge).
    scores = torch.tensor([[1e-6, 2e-6, 20.0], [1e-3, 3.0, 20.0]], requires_grad=True)
    keep = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    weights = power_softmax(scores, power=power, eps=1e-30, mask=keep)
    assert torch.isfinite(weights).all() and (weights[:, 2] == 0).all()
    torch.testing.assert_close(weights.double(), reference(scores.detach(), power, 1e-30, keep, "sum"), rtol=1e-4, atol=0)
    weights.sum().backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[:, 2] == 0).all()
