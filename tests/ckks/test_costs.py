"""The planner prices circuits on rings it has no keys for, and picks the cheapest."""

import pytest

from hf_polyattn.ckks import CKKSClient, CKKSParameters, SecureSession
from hf_polyattn.ckks.costs import OpCosts, choose_parameters, predict_seconds
from hf_polyattn.ckks.planner import circuit_depth
from tests.helpers import polynomial_tiny


# the 1-layer tiny model's; by rotations: norm sums (block 32), head sums (block 8), RoPE (heads of
# 8); the packed KV cache's value masks (its 128 copies fill the slots: no spread)
SHAPES = {(32, 32), (32, 32, 32), (32, 32, 8), (32, 64), (64, 32), (32, 97), (32, 32, "copy_mask"), (32, 32, "rotary", 8)}


def costs(ring: int, levels: int, refresh: float, op: float, **params) -> OpCosts:
    parameters = CKKSParameters(poly_modulus_degree=ring, levels=levels, **params)
    return OpCosts(parameters, op, op, op / 10, refresh, {shape: op for shape in SHAPES}, rotation=op)


@pytest.fixture(scope="module")
def server():
    return SecureSession(polynomial_tiny(num_hidden_layers=1), client=CKKSClient()).server


def test_more_levels_mean_fewer_refreshes_for_the_same_circuit(server):
    depth = circuit_depth(server)
    plans = [server.plan(3, top_level=levels) for levels in (1, 2, 7, depth)]
    refreshes = [plan["refreshes"] for plan in plans]
    assert refreshes == sorted(refreshes, reverse=True) and refreshes[0] > refreshes[-2]
    assert refreshes[-1] == 0  # a ring as deep as one step never refreshes
    # (not monotone everywhere: refreshing each operand when it runs out, a ring a little short of
    # the step refreshes many parallel values near the end where a shallower one refreshed their
    # common ancestor once; where to refresh is the planner's next improvement)
    # the operations themselves do not depend on the ring
    assert all(plan["ops"]["ct×ct"] == plans[0]["ops"]["ct×ct"] and plan["matmuls"] == plans[0]["matmuls"] for plan in plans)


def test_prediction_is_counts_times_costs(server):
    plan = server.plan(2)
    assert set(plan["matmuls"]) == SHAPES
    unit = costs(8192, 2, refresh=1.0, op=0.0)
    assert predict_seconds(plan, unit) == pytest.approx(plan["refreshes"])
    per_op = costs(8192, 2, refresh=0.0, op=1.0)
    matmuls = sum(plan["matmuls"].values())
    ops = plan["ops"]
    assert ops["rotation"] > 0  # the sums over the packed cache's copies
    assert predict_seconds(plan, per_op) == pytest.approx(ops["ct×ct"] + ops["ct×pt"] + ops["add"] / 10 + ops["rotation"] + matmuls)


def test_choice_follows_the_costs(server):
    small = costs(8192, 2, refresh=0.01, op=0.001)
    large = costs(16384, 7, refresh=0.02, op=0.008)
    assert choose_parameters(server, 2, [small, large])[0] is small  # cheap ops dominate
    expensive_refresh = costs(8192, 2, refresh=10.0, op=0.001)
    chosen, table = choose_parameters(server, 2, [expensive_refresh, large])
    assert chosen is large and table[0]["predicted_seconds"] > table[1]["predicted_seconds"]
    with pytest.raises(ValueError, match="no candidate"):
        choose_parameters(server, 2, [])
    unmeasured = OpCosts(small.params, 0.0, 0.0, 0.0, 0.0, {})
    with pytest.raises(ValueError, match="no measured cost"):
        predict_seconds(server.plan(1), unmeasured)


def test_rings_too_imprecise_for_the_normaliser_are_refused(server):
    coarse = costs(8192, 4, refresh=1e-4, op=1e-4, scale_bits=30, first_bits=49)
    fine = costs(8192, 2, refresh=0.01, op=0.001)
    chosen, table = choose_parameters(server, 2, [coarse, fine])
    # cheaper on paper, but a 30-bit scale's noise on the smallest normaliser makes 1/x diverge
    assert table[0]["predicted_seconds"] < table[1]["predicted_seconds"] and not table[0]["precise_enough"]
    assert chosen is fine
    with pytest.raises(ValueError, match="precise enough"):
        choose_parameters(server, 2, [coarse])


def test_measured_costs_time_every_primitive_on_a_real_ring(server):
    from hf_polyattn.ckks.costs import measure_op_costs

    # 72 rows do not divide the 4096 slots: priced by the same BSGS product the server runs
    shapes = [(72, 72), (64, 64), (72, 72, 8), (72, 72, "copy_mask"), (72, 72, "copy_spread")]
    measured = measure_op_costs(CKKSParameters(), shapes, repeats=1)
    assert min(measured.ct_ct, measured.ct_pt, measured.add, measured.refresh, measured.rotation) > 0
    assert set(measured.matmul) == set(shapes) and min(measured.matmul.values()) > 0
    assert measured.refresh > measured.add  # a round trip decrypts and re-encrypts
    with pytest.raises(ValueError, match="no measured cost for a 32×[0-9]+ product"):
        predict_seconds(server.plan(1), measured)
