"""The one circuit: its plaintext run equals the model's polynomial form, its symbolic run the
server's level accounting, and a built server is a snapshot of the model."""

import numpy as np
import pytest
import torch

from hf_polyattn.ckks import CKKSClient, CKKSServer, ClientRoundTrip
from hf_polyattn.ckks.matmul import BlockSumMatrix, CopyMask, CopySpread, PlaintextMatrix, RotaryMatrix
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

    def _like(self, values):
        return type(self)(values)

    def __add__(self, other):
        return self._like(self.values + self._other(other))

    __radd__ = __add__

    def __sub__(self, other):
        return self._like(self.values - self._other(other))

    def __rsub__(self, other):
        return self._like(self._other(other) - self.values)

    def __mul__(self, other):
        return self._like(self.values * self._other(other))

    __rmul__ = __mul__

    def __neg__(self):
        return self._like(-self.values)

    def matmul(self, matrix):
        return self._like(self.values @ matrix.matrix)


class SlotVector(PlainVector):
    """A vector of `size` values over every slot of a ring, with the server's slot semantics in
    numpy: the reference for the packed KV cache's layout. A weight product computes TenSEAL's
    diagonals over the cyclic slots (`y[j] = Σ_k W[(j+k) mod rows, j mod cols]·x[j+k]`, so where
    the rows do not divide the slots its last outputs read past the cut copy, as on the server),
    masked to the matrix's `output_slots` (its columns taking turns copy by copy where it fuses
    products, `slot_columns`); RoPE reads each slot and its pair half a head away;
    block sums are window sums, a mask and a spread; rotations are `np.roll`; `replicated` repeats the first `size` values (a refresh). Nothing
    else is refreshed: no slot is put right again that the server would not put right."""

    def __init__(self, values, size: int):
        super().__init__(values)
        self.size = size

    def _like(self, values, size=None):
        return type(self)(values, self.size if size is None else size)

    def matmul(self, matrix):
        x, slots = self.values, len(self.values)
        j = np.arange(slots)
        if isinstance(matrix, CopyMask):
            return self._like(x * matrix.mask_values())
        if isinstance(matrix, CopySpread):  # copy 0, everywhere
            return self._like(np.resize(x[: matrix.rows], slots))
        if isinstance(matrix, BlockSumMatrix):
            window = sum(np.roll(x, -i) for i in range(matrix.block))
            if matrix.block == matrix.rows:
                return self._like(window * matrix.factor)
            starts = (j % matrix.rows % matrix.block == 0) & (j + matrix.block <= slots)
            return self._like(sum(np.roll(window * starts * matrix.factor, i) for i in range(matrix.block)))
        if isinstance(matrix, RotaryMatrix):  # slot j reads j and its pair half a head after or before it
            half, local = matrix.head_dim // 2, j % matrix.rows
            pair = np.where(local % matrix.head_dim < half, local + half, local - half)
            y = matrix.matrix[local, local] * x + matrix.matrix[pair, local] * np.where(local % matrix.head_dim < half, np.roll(x, -half), np.roll(x, half))
            return self._like(y if matrix.output_slots is None else y * matrix.output_slots)
        columns = matrix.slot_columns(slots)  # j mod cols; for products taking turns copy by copy, theirs
        y = sum(matrix.matrix[(j + k) % matrix.rows, columns] * np.roll(x, -k) for k in range(matrix.rows))
        return self._like(y if matrix.output_slots is None else y * matrix.output_slots, matrix.cols)

    def rotate(self, step: int):
        return self._like(np.roll(self.values, -step))

    def rotate_sum(self, stride: int, count: int):
        return self._like(sum(np.roll(self.values, -i * stride) for i in range(count)))

    def replicated(self):
        return self._like(np.resize(self.values[: self.size], len(self.values)))


def server_circuit_logits(server, embeddings: np.ndarray, vocab: int) -> np.ndarray:
    """The server's own circuit and matrices, on unencrypted slot vectors."""
    server.reset()
    slots = server.engine.seal.slots
    return np.stack([server.circuit.step(SlotVector(np.resize(e, slots), len(e))).values[:vocab] for e in embeddings])


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


@pytest.mark.parametrize("top_level, dense_depth", [(2, 2), (3, 1), (None, 1)])
def test_a_symbolic_dense_product_of_a_fresh_input_drops_a_level_on_a_two_level_ring(top_level, dense_depth):
    # what the server's Cipher.matmul does (drops_a_level_first): counted, so the plan stays exact
    dense, block_sum = PlaintextMatrix(np.ones((4, 4))), BlockSumMatrix(4, 2)
    tally = CircuitTally(top_level)
    x = tally.fresh(4)
    assert (x.matmul(dense).depth, tally.levels_consumed) == (dense_depth, dense_depth)
    assert x.matmul(block_sum).depth == 1  # rotations and one mask: it keeps its level
    assert (x * 1.0).matmul(dense).depth == 2  # an input a level down already drops nothing


def test_a_built_server_is_a_snapshot_of_the_model():
    model = polynomial_tiny(num_hidden_layers=1)
    ids = random_ids(1, 4, seed=3)
    embeddings = model.get_input_embeddings()(ids[0]).detach().double().numpy()
    client = CKKSClient()
    server = CKKSServer(model, client.public_context(), ClientRoundTrip(client))

    def server_logits():  # the server's own circuit and matrices, on unencrypted vectors
        return server_circuit_logits(server, embeddings, model.config.vocab_size)

    before = server_logits()
    model.to_exact()  # the model moves on (its norms' inverse sqrt included); the server must not
    assert np.array_equal(server_logits(), before)
    model.to_polynomial(calibration_data=[random_ids(2, 8, seed=9)], progress=False)  # recalibrated
    assert np.array_equal(server_logits(), before)


@pytest.mark.parametrize("form", ["sum", "mean"])
@pytest.mark.parametrize("kv_copies", [None, 3, 1])
def test_the_packed_kv_cache_computes_the_polynomial_form(form, kv_copies):
    # width 32 on 4096 slots: 128 copies fill the slots (sums by rotation only); 3 do not (the sum
    # is right in copy 0 and spread), and 7 positions fill two ciphertexts and start a third
    model = polynomial_tiny(num_hidden_layers=2, attn_form=form)
    ids = random_ids(1, 7, seed=5)
    embeddings = model.get_input_embeddings()(ids[0]).detach().double().numpy()
    client = CKKSClient()
    server = CKKSServer(model, client.public_context(), ClientRoundTrip(client), kv_copies=kv_copies)
    plan = server.circuit_plan
    assert plan.kv_copies == {None: 128, 3: 3, 1: 1}[kv_copies] and plan.copies_fill_slots == (kv_copies is None)
    logits = server_circuit_logits(server, embeddings, model.config.vocab_size)
    assert len(server.circuit.keys[0]) == -(-7 // plan.kv_copies)  # ciphertexts in the cache
    with torch.no_grad():
        reference = model.double()(ids).logits[0].numpy()
    assert np.abs(logits - reference).max() < 1e-5 * np.abs(reference).max()


@pytest.mark.parametrize("kv_copies, tokens", [(None, 86), (3, 9)])  # 86: into the last copies, and past them
def test_a_model_whose_products_do_not_divide_the_slots_packs_copies_its_projections_get_right(kv_copies, tokens):
    # d = 48 does not divide the 4096 slots: a projection's last outputs read past the cut copy of its
    # input, and how far depends on the products since the last refresh (the slot reference was off
    # by 2e-3 with 85 copies and no refresh). Refreshing the projections' input first makes them right
    # up to slot 4096 - 48, so (4096 - 47) // 48 = 84 copies fit
    model = polynomial_tiny(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    plan = CircuitPlan.from_model(model, slots=4096)
    assert plan.kv_copies == 84 and plan.replicates_projection_input and not plan.copies_fill_slots
    with pytest.raises(ValueError, match=r"kv_copies must be in \[1, 84\] \(\[48, 48, 96\] do not divide the 4096 slots"):
        CircuitPlan.from_model(model, slots=4096, kv_copies=85)
    ids = random_ids(1, tokens, seed=8)
    embeddings = model.get_input_embeddings()(ids[0]).detach().double().numpy()
    client = CKKSClient()
    server = CKKSServer(model, client.public_context(), ClientRoundTrip(client), kv_copies=kv_copies)
    logits = server_circuit_logits(server, embeddings, model.config.vocab_size)
    assert len(server.circuit.keys[0]) == -(-tokens // server.circuit_plan.kv_copies)
    with torch.no_grad():
        reference = model.double()(ids).logits[0].numpy()
    assert np.abs(logits - reference).max() < 1e-5 * np.abs(reference).max()


def test_query_and_key_norms_are_not_packed_where_products_do_not_divide_the_slots():
    model = polynomial_tiny(num_hidden_layers=1, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                            num_key_value_heads=2, qk_norm=True)
    assert CircuitPlan.from_model(model, slots=4096).kv_copies == 1
    with pytest.raises(ValueError, match="query/key norms are not planned for with packing"):
        CircuitPlan.from_model(model, slots=4096, kv_copies=2)


def test_packing_costs_a_level_only_where_the_copies_do_not_fill_the_slots():
    model = polynomial_tiny(num_hidden_layers=2)
    depth, products = {}, {}
    for copies in (1, 3, 128):
        plan = CircuitPlan.from_model(model, slots=4096, kv_copies=copies)
        depth[copies] = circuit_depths(plan)["total_depth"]
        products[copies] = symbolic_run(plan, 7).ops["ct×ct"]
    assert depth[128] == depth[1] and depth[3] == depth[1] + 2  # the spread: one level, in each block
    for copies in (3, 128):
        # q ⊙ k, two squarings (p = 4) and power ⊙ v per cached ciphertext, in each of 2 layers, over 7
        # steps: position t reads t ciphertexts unpacked, ceil(t / copies) packed
        saved = sum(t - -(-t // copies) for t in range(1, 8))
        assert products[1] - products[copies] == 4 * 2 * saved
    with pytest.raises(ValueError, match="kv_copies must be in"):
        CircuitPlan.from_model(model, slots=4096, kv_copies=129)


def test_a_packed_cache_takes_the_key_and_the_value_from_one_product():
    model = polynomial_tiny(num_hidden_layers=2)
    d = model.config.hidden_size
    projections = {}
    for copies in (1, 3):
        plan = CircuitPlan.from_model(model, slots=4096, kv_copies=copies)
        assert plan.fuses_key_value == (copies > 1)
        tally = symbolic_run(plan, 4)
        projections[copies] = (tally.matmuls[(d, plan.width)], tally.ops.get("rotation", 0))
    # query, key and value (and the output, d = width here) per layer and step unpacked; packed, the
    # key and the value from one product, and one rotation moving one of them into its copy
    assert projections[1][0] - projections[3][0] == 2 * 4
    assert projections[3][1] > 0 and projections[1][1] == 0


class TrackedVector(PlainVector):
    """A `PlainVector` that remembers the largest magnitude any vector of the circuit reached
    (every operator of `PlainVector` makes its result with `_like`, `type(self)`)."""

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
