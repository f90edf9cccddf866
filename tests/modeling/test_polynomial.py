"""Approximations: stated error holds on a denser sweep, declared depth equals measured depth."""

import math

import pytest
import torch

from hf_polyattn.modeling.polynomial import (
    ChebyshevApproximation,
    InverseSqrtApproximation,
    LevelCounter,
    ReciprocalApproximation,
    build_approximation,
)

APPROXIMATIONS = {
    "goldschmidt": lambda: ReciprocalApproximation([0.05, 20.0]),
    "goldschmidt-k3": lambda: ReciprocalApproximation([0.5, 2.0], iterations=3),
    "goldschmidt-init2": lambda: ReciprocalApproximation([0.1, 10.0], init_degree=2),
    "goldschmidt-wide": lambda: ReciprocalApproximation([1e-6, 4.0], tolerance=1e-4),
    "newton-reciprocal": lambda: ReciprocalApproximation([0.1, 10.0], method="newton"),
    "newton-reciprocal-init1": lambda: ReciprocalApproximation([1.0, 8.0], method="newton", init_degree=1),
    "inv-sqrt": lambda: InverseSqrtApproximation([0.01, 5.0]),
    "inv-sqrt-init3": lambda: InverseSqrtApproximation([0.01, 5.0], init_degree=3),
    "inv-sqrt-k0": lambda: InverseSqrtApproximation([0.5, 2.0], iterations=0),
    "silu-8": lambda: ChebyshevApproximation("silu", 8, [-6.0, 6.0]),
    "silu-16": lambda: ChebyshevApproximation("silu", 16, [-10.0, 4.0]),
    "gelu-15": lambda: ChebyshevApproximation("gelu", 15, [-8.0, 8.0]),
    "gelu-tanh-7": lambda: ChebyshevApproximation("gelu_pytorch_tanh", 7, [-4.0, 4.0]),
    "relu-32": lambda: ChebyshevApproximation("relu", 32, [-1.0, 1.0]),
}


@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_stated_max_error_holds_on_a_denser_sweep(name):
    approximation = APPROXIMATIONS[name]()
    low, high = approximation.domain
    dense = approximation.sweep(200_001)
    random = low + (high - low) * torch.rand(100_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for grid in (dense, random):
        worst = float(approximation.errors(grid).max())
        assert worst <= approximation.max_error * 1.01 + 1e-12, (worst, approximation.max_error)
    # float32 tensors through __call__ (the model's path) keep float64 accuracy up to the cast
    x = dense[::97].float()
    expected = approximation.exact(x.double())
    got = approximation(x).double()
    scale = expected.abs() if approximation.error_kind == "relative" else 1.0
    assert float(((got - expected).abs() / scale).max()) <= approximation.max_error * 1.01 + 1e-6


@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_declared_depth_equals_measured_depth(name):
    approximation = APPROXIMATIONS[name]()
    assert approximation.measure()["depth"] == approximation.depth


def test_iterations_follow_the_analytic_goldschmidt_bound():
    # From the constant 2/(a+b), |e0| <= (b-a)/(b+a) and the relative error is |e0|^(2^k).
    low, high, tolerance = 0.01, 3.0, 1e-5
    approximation = ReciprocalApproximation([low, high], tolerance=tolerance)
    e0 = (high - low) / (high + low)
    expected = math.ceil(math.log2(math.log(tolerance) / math.log(e0)))
    assert approximation.iterations == expected
    assert approximation.max_error <= tolerance
    assert approximation.max_error == pytest.approx(e0 ** (2**expected), rel=1e-6)
    assert approximation.depth == 1 + expected


def test_spec_round_trips_to_the_same_function():
    for make in APPROXIMATIONS.values():
        approximation = make()
        again = build_approximation(approximation.spec())
        x = approximation.sweep(513)
        assert torch.equal(again(x), approximation(x))


def test_level_counter_counts_levels_and_products():
    x = LevelCounter()
    y = x * x  # ct×ct
    z = 3.0 * y + x  # ct×pt, add
    w = z * y
    assert (y.level, z.level, w.level) == (1, 2, 3)
    assert x.tally == {"ct_ct": 2, "ct_pt": 1}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ReciprocalApproximation([2.0, 1.0]), "low < high"),
        (lambda: ReciprocalApproximation([1.0, 1.0]), "low < high"),
        (lambda: ReciprocalApproximation([0.0, 1.0]), "positive"),
        (lambda: InverseSqrtApproximation([-1.0, 1.0]), "positive"),
        (lambda: ReciprocalApproximation([0.1, 1.0], iterations=-1), "iterations"),
        (lambda: InverseSqrtApproximation([0.1, 1.0], iterations=-2), "iterations"),
        (lambda: ChebyshevApproximation("silu", 0, [-1.0, 1.0]), "degree"),
        (lambda: ChebyshevApproximation("silu", 4, [1.0, -1.0]), "low < high"),
        (lambda: ChebyshevApproximation("no_such_act", 4, [-1.0, 1.0]), "unknown activation"),
        (lambda: ReciprocalApproximation([0.1, 1.0], method="halley"), "method"),
        (lambda: ReciprocalApproximation([0.1, 1.0], init_degree=-1), "init_degree"),
        (lambda: build_approximation({"kind": "exp", "domain": [0, 1]}), "unknown approximation kind"),
        (lambda: build_approximation({"kind": "reciprocal"}), "no domain"),
    ],
)
def test_bad_input_raises_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()
