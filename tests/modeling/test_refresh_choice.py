"""Approximations chosen for a ring's refreshes: fewer refreshes than the shallowest circuits, same tolerance."""

import pytest

from hf_polyattn.modeling.circuit import CircuitPlan, circuit_depths, symbolic_run
from hf_polyattn.modeling.polynomial import SWEEP_POINTS, build_approximation
from hf_polyattn.modeling.polynomial_form import DEFAULT_LEVELS_PER_REFRESH, approximated_ops
from hf_polyattn.modeling.refresh_choice import site_candidates
from tests.helpers import random_ids, tiny_model

CALIBRATION = [random_ids(4, 16, seed=s) for s in range(4)]


def _polynomial(**options):
    return tiny_model(attn_eps=1e-2).to_polynomial(calibration_data=CALIBRATION, progress=False, **options)


def _cost(model, levels: int = DEFAULT_LEVELS_PER_REFRESH):
    plan = CircuitPlan.from_model(model)
    return symbolic_run(plan, 3, top_level=levels).refreshes, [b["depth"] for b in circuit_depths(plan)["blocks"]]


def test_the_default_choice_refreshes_less_than_the_shallowest_circuits_within_the_tolerance():
    shallowest, chosen = _polynomial(levels_per_refresh=None), _polynomial()
    (least_depth_refreshes, least_depths), (refreshes, depths) = _cost(shallowest), _cost(chosen)
    assert refreshes < least_depth_refreshes
    assert all(d >= s for d, s in zip(depths, least_depths))  # what it trades: depth
    tolerance = chosen.config.polynomial["tolerance"]
    for name, op in approximated_ops(chosen.model).items():
        assert op.approximation.spec() == chosen.config.polynomial["sites"][name]  # saved as installed
        if op.kind != "activation":
            assert op.approximation.sweep_error(SWEEP_POINTS) <= tolerance, name
    # a saved spec rebuilds the same circuit
    rebuilt = {name: build_approximation(site).spec() for name, site in chosen.config.polynomial["sites"].items()
               if "kind" in site}
    assert rebuilt == {name: site for name, site in chosen.config.polynomial["sites"].items() if "kind" in site}


def test_a_block_depth_bound_is_kept_where_the_shallowest_circuits_keep_it():
    least_depths = _cost(_polynomial(levels_per_refresh=None))[1]
    unbounded_refreshes, unbounded_depths = _cost(_polynomial())
    bound = max(least_depths)
    assert max(unbounded_depths) > bound  # else the bound would test nothing
    refreshes, depths = _cost(_polynomial(max_block_depth=bound))
    assert max(depths) <= bound
    assert unbounded_refreshes <= refreshes <= _cost(_polynomial(levels_per_refresh=None))[0]


def test_a_site_keeps_only_candidates_no_other_beats_on_depth_and_refreshes():
    candidates = site_candidates({"kind": "inv_sqrt", "method": "newton", "domain": [0.003, 0.2]}, 1e-3, 2)
    assert len(candidates) >= 2
    assert all(c.sweep_error(SWEEP_POINTS) <= 1e-3 for c in candidates)
    depths = [c.depth for c in candidates]
    assert len(set(depths)) == len(depths)  # one per depth at most: a deeper one must refresh less


@pytest.mark.parametrize(
    "options, message",
    [
        ({"levels_per_refresh": None, "max_block_depth": 40}, "give levels_per_refresh too"),
        ({"levels_per_refresh": 0}, "levels_per_refresh must be"),
        ({"max_block_depth": 2.5}, "max_block_depth must be"),
    ],
)
def test_bad_choice_options_are_refused_before_calibration(options, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model.to_polynomial(calibration_data=iter(()), progress=False, **options)  # nothing read yet
