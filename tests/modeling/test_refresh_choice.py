"""Approximations chosen for a ring's refreshes: fewer refreshes than the shallowest circuits, same tolerance."""

import pytest

from hf_polyattn.ckks import CKKSParameters, fit_to_ring
from hf_polyattn.ckks.server import circuit_options
from hf_polyattn.modeling.circuit import CircuitPlan, circuit_depths, symbolic_run
from hf_polyattn.modeling.polynomial import SWEEP_POINTS, build_approximation
from hf_polyattn.modeling.polynomial_form import approximated_ops
from hf_polyattn.modeling.refresh_choice import choose_for_refreshes, site_candidates
from tests.helpers import random_ids, tiny_model

CALIBRATION = [random_ids(4, 16, seed=s) for s in range(4)]
RING = CKKSParameters()


def _polynomial():
    return tiny_model(attn_eps=1e-2).to_polynomial(calibration_data=CALIBRATION, progress=False)


def _cost(model):
    """Refreshes of 3 steps on the default ring, as its server plans them, and each block's depth."""
    plan = CircuitPlan.from_model(model, **circuit_options(RING))
    return symbolic_run(plan, 3, top_level=RING.levels).refreshes, [b["depth"] for b in circuit_depths(plan)["blocks"]]


def test_a_model_fitted_to_the_ring_refreshes_less_within_the_tolerance():
    shallowest, fitted = _polynomial(), fit_to_ring(_polynomial(), progress=False)
    (least_depth_refreshes, least_depths), (refreshes, depths) = _cost(shallowest), _cost(fitted)
    assert refreshes < least_depth_refreshes
    assert max(depths) > max(least_depths)  # what it trades: depth
    spec = fitted.config.polynomial
    assert spec["fit"] == {"levels_per_refresh": 2, "slots": 4096, "scale_bits": 40, "max_block_depth": None}
    for name, op in approximated_ops(fitted.model).items():
        assert op.approximation.spec() == spec["sites"][name]  # the config describes what runs
        assert build_approximation(spec["sites"][name]).spec() == spec["sites"][name]  # and rebuilds it
        if op.kind != "activation":
            assert op.approximation.sweep_error(SWEEP_POINTS) <= spec["tolerance"], name
    # a server built from the fitted model plans what the choice measured (the same circuit)
    fitted.to_exact().to_polynomial()
    assert _cost(fitted)[0] == refreshes


def test_a_block_depth_bound_is_kept_where_the_shallowest_circuits_keep_it():
    least_refreshes, least_depths = _cost(_polynomial())
    unbounded_refreshes, unbounded_depths = _cost(fit_to_ring(_polynomial(), progress=False))
    bound = max(least_depths)
    assert max(unbounded_depths) > bound  # else the bound would test nothing
    refreshes, depths = _cost(fit_to_ring(_polynomial(), max_block_depth=bound, progress=False))
    assert max(depths) <= bound
    assert refreshes <= least_refreshes


def test_a_site_keeps_only_candidates_no_other_beats_on_depth_and_refreshes():
    candidates = site_candidates({"kind": "inv_sqrt", "method": "newton", "domain": [0.003, 0.2]}, 1e-3, 2)
    assert len(candidates) >= 2
    assert all(c.sweep_error(SWEEP_POINTS) <= 1e-3 for c in candidates)
    depths = [c.depth for c in candidates]
    assert len(set(depths)) == len(depths)  # one per depth at most: a deeper one must refresh less


def test_fixed_degrees_are_kept():
    model = tiny_model(attn_eps=1e-2).to_polynomial(
        calibration_data=CALIBRATION, progress=False, inv_sqrt={"init_degree": 31}, reciprocal={"init_degree": 31}
    )
    before = dict(model.config.polynomial["sites"])
    assert fit_to_ring(model, progress=False).config.polynomial["sites"] == before


@pytest.mark.parametrize(
    "levels, bound, message",
    [(0, None, "levels_per_refresh must be"), (2, 2.5, "max_block_depth must be"), (True, None, "levels_per_refresh")],
)
def test_bad_choice_options_are_refused(levels, bound, message):
    with pytest.raises(ValueError, match=message):
        choose_for_refreshes(tiny_model(), levels, bound)


def test_a_model_not_in_polynomial_form_is_refused():
    with pytest.raises(ValueError, match="not in polynomial form"):
        fit_to_ring(tiny_model(), progress=False)
