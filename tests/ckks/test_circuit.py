"""The one circuit: its plaintext run equals the model's polynomial form, its symbolic run the
server's level accounting, and a built server is a snapshot of the model."""

import numpy as np
import pytest
import torch

from hf_polyattn.ckks import CKKSClient, CKKSServer, ClientRoundTrip
from hf_polyattn.ckks.server import ServerMatrices
from hf_polyattn.modeling.circuit import CircuitPlan, DecoderCircuit, ShapeMatrices, circuit_depths, symbolic_run
from hf_polyattn.modeling.symbolic import CircuitTally
from tests.helpers import polynomial_tiny, random_ids


class PlainVector:
    """A float64 vector with the operators of a ciphertext: the circuit with no encryption."""

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float64)

    def _other(self, other):
        return other.values if isinstance(other, PlainVector) else other

    def __add__(self, other):
        return type(self)(self.values + self._other(other))

    __radd__ = __add__

    def __sub__(self, other):
        return type(self)(self.values - self._other(other))

    def __rsub__(self, other):
        return type(self)(self._other(other) - self.values)

    def __mul__(self, other):
        return type(self)(self.values * self._other(other))

    __rmul__ = __mul__

    def __neg__(self):
        return type(self)(-self.values)

    def matmul(self, matrix):
        return type(self)(self.values @ matrix.matrix)


def circuit_logits(model, ids: torch.Tensor) -> np.ndarray:
    plan = CircuitPlan.from_model(model)
    circuit = DecoderCircuit(plan, ServerMatrices(model, plan, lm_head=True))
    embeddings = model.get_input_embeddings()(ids[0]).detach().double().numpy()
    return np.stack([circuit.step(PlainVector(e)).values for e in embeddings])


@pytest.mark.parametrize("form", ["sum", "mean"])
def test_the_circuit_with_folded_maps_computes_the_polynomial_form(form):
    model = polynomial_tiny(num_hidden_layers=2, attn_form=form)
    ids = random_ids(1, 7, seed=5)
    with torch.no_grad():
        reference = model.double()(ids).logits[0].numpy()
    assert np.abs(circuit_logits(model, ids) - reference).max() < 1e-5 * np.abs(reference).max()  # RoPE tables are float32


def test_the_report_is_the_symbolic_run_of_the_circuit():
    model = polynomial_tiny(num_hidden_layers=2)
    report = model.polynomial_report()
    plan = CircuitPlan.from_model(model)
    tally = CircuitTally()
    out = DecoderCircuit(plan, ShapeMatrices(plan)).step(tally.fresh(plan.hidden_size))
    assert report["total_depth"] == out.depth == circuit_depths(plan)["total_depth"]
    assert report["total_depth"] == sum(b["depth"] for b in report["blocks"]) + report["head_depth"]
    # a ring deep enough for one step never refreshes; one level fewer than the depth must
    assert symbolic_run(plan, 1, top_level=out.depth).refreshes == 0
    assert symbolic_run(plan, 1, top_level=out.depth - 1).refreshes > 0
    with pytest.raises(ValueError, match="refreshing is disabled"):
        symbolic_run(plan, 1, top_level=out.depth - 1, refresh_allowed=False)


def test_symbolic_cipher_counts_levels_and_refreshes():
    tally = CircuitTally(top_level=2)
    x = tally.fresh(4)
    y = (x * x) * 3.0  # two levels: the ring's last
    assert y.depth == 2 and tally.refreshes == 0
    z = y * x  # y has no level left: refreshed first
    assert (z.depth, tally.refreshes) == (1, 1)
    assert (y * x).depth == 1 and tally.refreshes == 1  # its refreshed copy is reused, not made again
    assert (x + y).depth == 2 and tally.ops["ct×ct"] == 3 and tally.ops["ct×pt"] == 1


def test_a_built_server_is_a_snapshot_of_the_model():
    model = polynomial_tiny(num_hidden_layers=1)
    ids = random_ids(1, 4, seed=3)
    embeddings = model.get_input_embeddings()(ids[0]).detach().double().numpy()
    client = CKKSClient()
    server = CKKSServer(model, client.public_context(), ClientRoundTrip(client))

    def server_logits():  # the server's own circuit and matrices, on unencrypted vectors
        server.reset()
        return np.stack([server.circuit.step(PlainVector(e)).values for e in embeddings])

    before = server_logits()
    model.to_exact()  # the model moves on (its norms' inverse sqrt included); the server must not
    assert np.array_equal(server_logits(), before)
    model.to_polynomial(calibration_data=[random_ids(2, 8, seed=9)], progress=False)  # recalibrated
    assert np.array_equal(server_logits(), before)


class TrackedVector(PlainVector):
    """A `PlainVector` that remembers the largest magnitude any vector of the circuit reached
    (every operator of `PlainVector` makes its result with `type(self)`)."""

    largest = 0.0

    def __init__(self, values):
        super().__init__(values)
        TrackedVector.largest = max(TrackedVector.largest, float(np.abs(self.values).max()))


@pytest.mark.parametrize("lm_head", [True, False])
def test_a_scaled_residual_stream_folds_exactly_and_keeps_the_squares_within_the_limit(lm_head):
    from tests.helpers import tiny_model

    model = tiny_model(num_hidden_layers=2, attn_eps=1.0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2000)  # residual values in the hundreds
    model.to_polynomial(calibration_data=[random_ids(4, 16, seed=s) for s in range(4)], progress=False)
    ids = random_ids(1, 5, seed=6)
    embeddings = model.get_input_embeddings()(ids[0]).detach().double().numpy()
    outputs, largest = {}, {}
    for limit in (None, 2.0**12):
        plan = CircuitPlan.from_model(model, value_limit=limit)
        circuit = DecoderCircuit(plan, ServerMatrices(model, plan, lm_head=lm_head), lm_head=lm_head)
        TrackedVector.largest = 0.0
        outputs[limit] = np.stack([circuit.step(TrackedVector(e)).values for e in embeddings])
        largest[limit] = TrackedVector.largest
    assert plan.residual_scale < 1 and np.log2(plan.residual_scale).is_integer()
    assert largest[None] > 2.0**12 >= largest[2.0**12]  # the norms' squares were the largest values
    reference = outputs[None]
    assert np.abs(outputs[2.0**12] - reference).max() < 1e-9 * np.abs(reference).max()
