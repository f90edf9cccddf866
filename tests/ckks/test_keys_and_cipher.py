"""Key separation, masked refresh, and the arithmetic guards of `Cipher`."""

import os
import tempfile

import numpy as np
import pytest
import tenseal as ts

from hf_polyattn.ckks import CKKSClient, CKKSParameters, ClientRoundTrip
from hf_polyattn.ckks.cipher import CipherEngine, DepthExceededError
from hf_polyattn.ckks.client import KEY_ID_BYTES, IntegrityError, RefreshRefused
from hf_polyattn.ckks.matmul import PlaintextMatrix
from hf_polyattn.ckks.seal_backend import SealBackend
from hf_polyattn.modeling.polynomial import ChebyshevApproximation, InverseSqrtApproximation, ReciprocalApproximation


@pytest.fixture(scope="module")
def client():
    return CKKSClient(CKKSParameters(poly_modulus_degree=8192, levels=2))


@pytest.fixture
def engine(client):
    return CipherEngine(client.public_context(), ClientRoundTrip(client, seed=0))


def secret_key_bytes(client) -> bytes:
    path = tempfile.mktemp()
    client._context.secret_key().data.save(path)
    data = open(path, "rb").read()
    os.remove(path)
    return data


def test_the_server_side_holds_no_secret_key(client, engine):
    public = client.public_context()
    ciphertext = client.encrypt([1.5, -2.0, 3.25])
    secret = secret_key_bytes(client)
    chunks = [secret[i : i + 64] for i in range(64, len(secret) - 64, len(secret) // 16)]
    # positive control: the chunks are found where the secret key is
    private = client._context.serialize(save_secret_key=True, save_galois_keys=False)
    assert all(chunk in private for chunk in chunks)
    # ... and found in nothing the server receives
    for received in (public, ciphertext):
        assert not any(chunk in received for chunk in chunks)
    server_context = ts.context_from(public)
    assert not server_context.is_private()
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(server_context, ciphertext[16:]).decrypt()
    # the engine refuses a context with a secret key
    with pytest.raises(ValueError, match="secret key"):
        CipherEngine(client._context.serialize(save_secret_key=True), None)


def test_refresh_restores_levels_and_values_and_the_client_sees_only_masked_values(client, engine):
    values = np.array([0.5, -1.25, 1.4, 0.125])  # x^32 stays within what the last level holds (2^19)
    seen = []
    original = client.refresh

    def spying_refresh(masked: bytes) -> bytes:
        seen.append(client.decrypt(masked))
        return original(masked)

    client.refresh = spying_refresh
    try:
        x = engine.load(client.encrypt(values))
        y = x
        for _ in range(5):  # 5 squarings of a 2-level ring: at least two refreshes
            y = y * y
    finally:
        client.refresh = original
    np.testing.assert_allclose(client.decrypt(y.serialize()), values**32, rtol=1e-3, atol=1e-6)
    assert engine.profiler.refreshes >= 2 and len(seen) == engine.profiler.refreshes
    for masked in seen:
        assert np.abs(masked).max() > 100  # masks of magnitude ~2^16, not the small activations


def test_plain_vectors_foreign_ciphertexts_and_sizes_are_refused(client, engine):
    x = engine.load(client.encrypt([1.0, 2.0]))
    with pytest.raises(TypeError, match="462"):
        x + [1.0, 2.0]
    with pytest.raises(TypeError, match="462"):
        x * np.array([1.0, 2.0])
    with pytest.raises(ValueError, match="size mismatch"):
        x * engine.load(client.encrypt([1.0, 2.0, 3.0]))
    other = CKKSClient(CKKSParameters(poly_modulus_degree=8192, levels=2))
    foreign_engine = CipherEngine(other.public_context(), None)
    with pytest.raises(ValueError, match="different contexts"):
        x + foreign_engine.load(other.encrypt([1.0, 2.0]))
    # same parameters, other keys: CKKS cannot tell, the key id can
    with pytest.raises(ValueError, match="key id differs"):
        engine.load(other.encrypt([1.0, 2.0]))
    with pytest.raises(ValueError, match="not a ciphertext of this context"):
        engine.load(client.key_id + b"not a ciphertext")


def test_tenseal_plain_list_bug_that_the_guard_exists_for(client):
    """TenSEAL issue #462: + a plain list, then matmul, is silently wrong. If this starts to
    pass, the upstream bug is fixed and the guard can be relaxed."""
    x, bias, weight = np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.1, 0.2, 0.3, 0.4]), np.eye(4)[:, :3] + 0.5
    vector = ts.ckks_vector(client._context, x.tolist())
    wrong = np.asarray((vector + bias.tolist()).matmul(weight.tolist()).decrypt())
    right = np.asarray((vector + ts.ckks_vector(client._context, bias.tolist())).matmul(weight.tolist()).decrypt())
    np.testing.assert_allclose(right, (x + bias) @ weight, atol=1e-4)
    assert np.abs(wrong - (x + bias) @ weight).max() > 1e-2


def test_depth_beyond_the_ring_without_refresh_raises(client):
    engine = CipherEngine(client.public_context(), refresher=None)
    x = engine.load(client.encrypt([0.5]))
    with pytest.raises(DepthExceededError, match="refreshing is disabled"):
        (x * x * x) * x


@pytest.mark.parametrize(
    "approximation",
    [
        ReciprocalApproximation([0.05, 4.0]),
        ReciprocalApproximation([0.5, 2.0], method="newton", init_degree=1),
        InverseSqrtApproximation([0.01, 3.0]),
        ChebyshevApproximation("silu", 12, [-6.0, 6.0]),
    ],
    ids=repr,
)
def test_approximation_circuits_run_on_ciphertexts(client, engine, approximation):
    x = approximation.sweep(64)
    encrypted = approximation.circuit(engine.load(client.encrypt(x.numpy())))
    expected = approximation.circuit(x).numpy()
    np.testing.assert_allclose(client.decrypt(encrypted.serialize()), expected, rtol=1e-3, atol=1e-4)


def test_parameters_below_128_bit_security_are_refused_before_tenseal_sees_them():
    with pytest.raises(ValueError, match="128-bit security"):
        CKKSParameters(poly_modulus_degree=8192, levels=4)
    with pytest.raises(ValueError, match="encryption parameters are not set correctly"):  # what TenSEAL says instead
        ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 40, 40, 60])
    top = CKKSParameters(poly_modulus_degree=8192, levels=CKKSParameters.max_levels(8192))
    assert top.security == "128-bit" and ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=list(top.coeff_mod_bit_sizes))
    assert CKKSParameters.max_levels(16384) == 7 and CKKSParameters.max_levels(32768) == 19


def test_refresh_masks_come_from_the_os_csprng_uniform_over_the_bound(client):
    refresher = ClientRoundTrip(client)
    first, second = refresher.draw_mask(200_000), refresher.draw_mask(200_000)
    bound = refresher.mask_bound
    assert first.min() >= -bound and first.max() < bound and not np.array_equal(first, second)
    assert abs(first.mean()) < 0.01 * bound and abs(first.std() - bound / 3**0.5) < 0.01 * bound
    # a seed (tests) makes them reproducible; without one nothing is
    assert np.array_equal(ClientRoundTrip(client, seed=5).draw_mask(8), ClientRoundTrip(client, seed=5).draw_mask(8))


def _refresh_request(client, values, level: str = "last") -> bytes:
    """What an honest server sends for a refresh: a ciphertext of `values` at the last level."""
    backend = SealBackend(client._context)
    ciphertext = client._context.seal_context().data
    ct = ts.ckks_vector(client._context, list(values)).ciphertext()[0]
    if level == "last":
        backend.evaluator.mod_switch_to_inplace(ct, ciphertext.last_parms_id())
    return client.key_id + backend.serialize(ct, len(values))


def test_the_client_refreshes_only_what_an_honest_server_sends(client):
    bound = 2 * client.params.mask_bound
    values = np.array([0.5, -3.0, 0.99 * bound, 7.0])
    fresh = client.refresh(_refresh_request(client, values))
    assert np.allclose(client.decrypt(fresh), values, atol=1e-3)
    refused = {
        "a fresh ciphertext (top level)": _refresh_request(client, values, level="top"),
        "values beyond twice the mask bound": _refresh_request(client, [0.5, 1.01 * bound]),
        "other keys": CKKSClient(client.params).key_id + _refresh_request(client, values)[KEY_ID_BYTES:],
        "bytes that do not parse": client.key_id + b"\x0a\x01" * 50,
    }
    for name, request in refused.items():
        with pytest.raises(RefreshRefused):
            client.refresh(request)
    with pytest.raises(RefreshRefused, match="more than 2"):
        client.refresh(_refresh_request(client, values), max_size=2)


def test_tampered_ciphertexts_raise_instead_of_decrypting_to_noise(client):
    values = np.linspace(-2, 2, 64)
    ciphertext = client.encrypt(values)
    rng = np.random.default_rng(0)
    outcomes = []
    for position in rng.integers(KEY_ID_BYTES + 16, len(ciphertext) - 16, 64):
        flipped = bytearray(ciphertext)
        flipped[position] ^= 0xA5
        try:
            decrypted = client.decrypt(bytes(flipped))
            outcomes.append("decrypted")
            assert np.abs(decrypted).max() <= client.params.max_magnitude
        except IntegrityError:
            outcomes.append("integrity")
        except ValueError:
            outcomes.append("unparsable")
    assert "integrity" in outcomes  # a flipped coefficient used to decrypt silently to ~1e31


def test_ciphertext_serialisation_writes_no_file_anyone_can_find(client):
    folders = ["/dev/shm", tempfile.gettempdir()]
    before = {folder: set(os.listdir(folder)) for folder in folders if os.path.isdir(folder)}
    backend = SealBackend(client._context)
    ct = ts.ckks_vector(client._context, [1.0, 2.0]).ciphertext()[0]
    assert backend.serialize(ct, 2) == backend.serialize(ct, 2)
    for folder, names in before.items():
        assert not {name for name in set(os.listdir(folder)) - names if "polyattn" in name}, folder


def all_slots(client, engine, cipher) -> np.ndarray:
    """Every slot of `cipher`, not only its first `size` values."""
    return client.decrypt(client.key_id + engine.seal.serialize(cipher.ct, client.params.slots), bound=np.inf)


# SmolLM2's 576×576, 576×1536 and 1536×576 scaled down by 8: rows that do not divide the 4096 slots
@pytest.mark.parametrize("rows, cols", [(72, 72), (72, 192), (192, 72)])
def test_bsgs_product_matches_numpy_and_tenseal_in_every_slot_when_rows_do_not_divide_the_slots(client, engine, rows, cols):
    assert client.params.slots % rows
    generator = np.random.default_rng(rows + cols)
    values, weights = generator.uniform(-1, 1, rows), generator.uniform(-1, 1, (rows, cols)) / 10
    x = engine.load(client.encrypt(values))
    product = x.matmul(PlaintextMatrix(weights))
    assert np.abs(client.decrypt(product.serialize()) - values @ weights).max() < 1e-5
    # TenSEAL's own matmul, slot for slot: the wrapped slots past the last whole copy included, so
    # whatever reads them next (a following product, a rotation) sees what it saw before BSGS
    reference = engine.load(client.key_id + x.vector.matmul(weights.tolist()).serialize())
    assert np.abs(all_slots(client, engine, product) - all_slots(client, engine, reference)).max() < 1e-5


def test_chained_bsgs_products_match_numpy_when_rows_do_not_divide_the_slots(client, engine):
    # an MLP's shape, scaled down: the second product reads the first's output past its width
    generator = np.random.default_rng(1)
    values = generator.uniform(-1, 1, 72)
    up, down = generator.uniform(-1, 1, (72, 192)) / 8, generator.uniform(-1, 1, (192, 72)) / 12
    x = engine.load(client.encrypt(values))
    out = x.matmul(PlaintextMatrix(up)).matmul(PlaintextMatrix(down))
    assert np.abs(client.decrypt(out.serialize()) - values @ up @ down).max() < 1e-4


def test_a_product_past_the_replicated_layouts_bound_is_refused(client, engine):
    # rows that do not divide the 4096 slots: right up to rows + cols = slots + 1, and TenSEAL's own
    # matmul, which reads the same slots, silently wrong past it (OpenMined/TenSEAL#504)
    rows, slots = 100, client.params.slots
    generator = np.random.default_rng(0)
    values, weights = generator.uniform(-1, 1, rows), generator.uniform(-1, 1, (rows, slots + 2 - rows)) / 10
    x = engine.load(client.encrypt(values))
    at_bound = x.matmul(PlaintextMatrix(weights[:, :-1]))
    assert np.abs(client.decrypt(at_bound.serialize()) - values @ weights[:, :-1]).max() < 1e-3
    with pytest.raises(NotImplementedError, match="rows \\+ cols > slots \\+ 1 \\(TenSEAL#504\\)"):
        x.matmul(PlaintextMatrix(weights))
    past = x.vector.matmul(weights.tolist())  # what the guard keeps from running: TenSEAL itself, one past
    decrypted = client.decrypt(client.key_id + past.serialize(), bound=np.inf)
    assert np.abs(decrypted - values @ weights).max() > 1e-2


def test_a_server_whose_products_tenseal_gets_wrong_is_refused_before_any_ciphertext(client):
    from hf_polyattn.ckks import CKKSServer
    from tests.helpers import polynomial_tiny

    # d=48 does not divide the slots, and the 48×4100 LM head is past TenSEAL's bound
    model = polynomial_tiny(num_hidden_layers=1, hidden_size=48, vocab_size=4100, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(NotImplementedError, match="48×4100 product"):
        CKKSServer(model, client.public_context(), ClientRoundTrip(client))
    CKKSServer(model, client.public_context(), ClientRoundTrip(client), lm_head=False)  # the head on the client: fine


def test_a_latency_profile_names_its_site_and_travels_as_json_only():
    import json

    from hf_polyattn.ckks import LatencyProfiler

    profiler = LatencyProfiler()
    assert profiler.site == "model / other"
    with profiler.scope("layer 1"), profiler.step("reciprocal"):
        assert profiler.site == "layer 1 / reciprocal"
        with profiler.op("ct×ct mult"):
            pass
    profiler.bytes["to_client"] += 7
    again = LatencyProfiler.from_dict(json.loads(json.dumps(profiler.to_dict())))
    assert again.counts == {"reciprocal": 1} and again.bytes["to_client"] == 7 and again.table() == profiler.table()
    with pytest.raises(ValueError, match="not a latency profile"):
        LatencyProfiler.from_dict({"seconds": {"x": "__import__('os')"}})


def test_encoded_diagonals_are_kept_within_the_budget_and_given_back_with_their_matrix(client, engine):
    import gc

    from hf_polyattn.ckks.matmul import EncodingBudget

    generator = np.random.default_rng(3)
    x = engine.load(client.encrypt(generator.uniform(-1, 1, 64)))
    kept = PlaintextMatrix(generator.uniform(-1, 1, (64, 64)))
    budget = EncodingBudget(max_bytes=10**12)
    kept.plaintexts(engine.seal, x.ct.parms_id(), budget)
    size = budget.kept_bytes
    assert size >= 64 * client.params.poly_modulus_degree * 8  # 64 diagonals of N coefficients (or more primes)
    tight = EncodingBudget(max_bytes=size)  # room for one matrix: the second is encoded at each use
    first, second = (PlaintextMatrix(generator.uniform(-1, 1, (64, 64))) for _ in range(2))
    once = PlaintextMatrix(generator.uniform(-1, 1, (64, 64)), reusable=False)
    for matrix in (first, second, once, second):
        matrix.plaintexts(engine.seal, x.ct.parms_id(), tight)
    assert tight.kept_bytes == size and tight.encoded_again == 2 * 64
    del first
    gc.collect()
    assert tight.kept_bytes == 0  # the dropped matrix gave its bytes back: the next one is kept
    second.plaintexts(engine.seal, x.ct.parms_id(), tight)
    assert tight.kept_bytes == size


def test_the_budget_keeps_the_smallest_diagonals_first(client, engine):
    from hf_polyattn.ckks.matmul import EncodingBudget

    generator = np.random.default_rng(5)
    x = engine.load(client.encrypt(generator.uniform(-1, 1, 64)))
    lower = x * 1.0  # a level down: its products' diagonals have one prime fewer
    top, low = (v.ct.parms_id() for v in (x, lower))
    big, small, other = (PlaintextMatrix(generator.uniform(-1, 1, (64, 64))) for _ in range(3))
    sizes = []
    for matrix, level in ((big, top), (small, low)):
        probe = EncodingBudget(max_bytes=10**12)
        matrix.plaintexts(engine.seal, level, probe)
        sizes.append(probe.kept_bytes)
        matrix.forget(tuple(level))
        assert probe.kept_bytes == 0  # forgotten: the bytes are back
    big_bytes, small_bytes = sizes
    assert small_bytes < big_bytes
    budget = EncodingBudget(max_bytes=big_bytes)
    big.plaintexts(engine.seal, top, budget)
    assert budget.kept_bytes == big_bytes
    small.plaintexts(engine.seal, low, budget)  # smaller diagonals: they take the big matrix's room
    assert budget.kept_bytes == small_bytes and budget.encoded_again == 0
    big.plaintexts(engine.seal, top, budget)  # now encoded again at each use
    other.plaintexts(engine.seal, low, budget)  # the same size as the kept one: no room is taken
    assert budget.kept_bytes == small_bytes and budget.encoded_again == 2 * 64
    # the product is the same whether its diagonals were kept, dropped or encoded again
    expected = x.matmul(PlaintextMatrix(big.matrix))
    assert np.allclose(client.decrypt(x.matmul(big).serialize()), client.decrypt(expected.serialize()), atol=1e-6)


# SmolLM2's 9 heads of 64 (576 slots, not dividing the 4096), a tiny model's 4 heads of 8, heads
# of 48 (not a power of two), and one block: SmolLM2's norm sum over 576
@pytest.mark.parametrize("heads, block", [(9, 64), (4, 8), (3, 48), (1, 576)])
def test_a_block_sum_by_rotations_matches_numpy_and_the_dense_product(client, engine, heads, block):
    from hf_polyattn.ckks.matmul import BlockSumMatrix

    width = heads * block
    values = np.random.default_rng(heads).uniform(-1, 1, width)
    matrix = BlockSumMatrix(width, block, factor=0.75)
    x = engine.load(client.encrypt(values))
    rotated = x.matmul(matrix)
    expected = np.repeat(values.reshape(heads, block).sum(axis=1), block) * 0.75
    tolerance = 1e-5 * max(1.0, np.abs(expected).max())  # CKKS noise, summed over a block
    assert np.abs(client.decrypt(rotated.serialize()) - expected).max() < tolerance
    assert rotated.level == x.level - 1  # one level, like the product it replaces
    # wherever the dense product is right (every slot a following product reads), the same values
    dense = x.matmul(PlaintextMatrix(matrix.matrix))
    valid = client.params.slots - width + 1
    assert np.abs(all_slots(client, engine, rotated)[:valid] - all_slots(client, engine, dense)[:valid]).max() < tolerance
    with pytest.raises(ValueError, match="a block dividing the width"):
        BlockSumMatrix(width, block + 1)


def test_products_and_sums_leave_both_operands_at_their_levels(client, engine):
    # operands of two levels meet at the lower one: a reused value (a cached key, a query) that
    # lost its levels in the meeting would be refreshed more often than the planner predicts
    x, y = (engine.load(client.encrypt(np.full(4, 0.5))) for _ in range(2))
    low = x * 0.5
    for left, right in ((low, y), (y, low)):
        product, total, difference = left * right, left + right, left - right
        assert (low.level, y.level) == (1, 2)
        assert (product.level, total.level, difference.level) == (0, 1, 1)
        assert np.allclose(client.decrypt(product.serialize()), 0.125, atol=1e-5)
        assert np.allclose(client.decrypt(total.serialize()), 0.75, atol=1e-5)
        assert np.allclose(client.decrypt(difference.serialize()), 0.25 if left is y else -0.25, atol=1e-5)
    assert np.allclose(client.decrypt((1.0 - low).serialize()), 0.75, atol=1e-5)
    assert np.allclose(client.decrypt((-low).serialize()), -0.25, atol=1e-5)


def test_a_dense_product_of_a_fresh_input_runs_a_level_lower_on_a_two_level_ring(client, engine):
    # two primes instead of three: about half the product's cost, for at most one more refresh;
    # the level it drops is counted, as the planner counts it (drops_a_level_first)
    from hf_polyattn.ckks.matmul import BlockSumMatrix

    generator = np.random.default_rng(7)
    values, weights = generator.uniform(-1, 1, 64), generator.uniform(-1, 1, (64, 64)) / 8
    x = engine.load(client.encrypt(values))
    before = engine.levels_consumed
    product = x.matmul(PlaintextMatrix(weights))
    assert (product.level, engine.levels_consumed - before) == (0, 2)
    assert np.abs(client.decrypt(product.serialize()) - values @ weights).max() < 1e-5
    assert (x * 1.0).matmul(PlaintextMatrix(weights)).level == 0  # a level down already: none dropped
    assert x.matmul(BlockSumMatrix(64, 8)).level == 1  # rotations and one mask: it keeps its level


def test_plaintext_products_come_back_at_exactly_the_scale(client, engine):
    # encoded at the scale of the prime their rescale removes (encode_factor): no scale/prime bias,
    # which was 1.3e-7 or 6.5e-7 of every value per product on this ring's two 40-bit primes
    values = np.random.default_rng(8).uniform(0.5, 1, 64)
    x = engine.load(client.encrypt(values))
    for y in (x * 1.0, (x * 1.0) * 1.0, x.matmul(PlaintextMatrix(np.eye(64)))):
        assert np.abs(client.decrypt(y.serialize()) - values).max() < 3e-8


def test_a_constant_that_encodes_to_zero_is_refused(client, engine):
    x = engine.load(client.encrypt([1.0, 2.0]))
    for constant in (0, 0.0, 1e-14):
        with pytest.raises(ValueError, match="encodes to zero"):
            x * constant


# SmolLM2's 576 (7 copies and a cut one of 64 values on 4096 slots) and a width filling the slots
@pytest.mark.parametrize("width", [576, 64])
def test_the_packed_kv_cache_primitives_match_numpy_in_every_slot(client, engine, width):
    from hf_polyattn.ckks.matmul import CopyMask, CopySpread

    slots = client.params.slots
    copies = slots // width
    generator = np.random.default_rng(width)
    positions = generator.uniform(-1, 1, (copies, width))  # what `copies` cached positions hold
    values = positions[0]
    x = engine.load(client.encrypt(values))
    # each position in its copy (a mask product), summed into one ciphertext: the packed layout
    packed = x.matmul(CopyMask(width, slots, 0))
    for copy in range(1, copies):
        packed = packed + engine.load(client.encrypt(positions[copy])).matmul(CopyMask(width, slots, copy))
    layout = np.zeros(slots)
    layout[: copies * width] = positions.ravel()
    assert packed.packed and packed.level == x.level - 1
    assert np.abs(all_slots(client, engine, packed) - layout).max() < 1e-5
    spent = packed
    while spent.level > 0:
        spent = spent * 1.0
    refreshed = engine.refresh(spent)  # every slot travels, each masked on its own
    assert refreshed.packed and np.abs(all_slots(client, engine, refreshed) - layout).max() < 1e-4
    # the sum over copies by rotations: whole in copy 0 (in every copy when they fill the slots)
    summed = packed.rotate_sum(width, copies)
    assert summed.level == packed.level and not summed.packed
    total = positions.sum(axis=0)
    assert np.abs(client.decrypt(summed.serialize()) - total).max() < 1e-4
    # spread from copy 0: TenSEAL's replicated layout, the cut copy included
    spread = summed.matmul(CopySpread(width, slots))
    assert np.abs(all_slots(client, engine, spread) - np.resize(total, slots)).max() < 1e-4
    if slots % width == 0:
        assert np.abs(all_slots(client, engine, summed) - np.resize(total, slots)).max() < 1e-4
    with pytest.raises(ValueError, match="whole copies"):
        CopyMask(width, slots, copies)


# SmolLM2's 576×576 scaled down by 8 (not dividing the slots), and a width that divides them
@pytest.mark.parametrize("rows, width", [(72, 72), (64, 64)])
def test_two_products_taking_turns_copy_by_copy_cost_one_and_rotate_into_place(client, engine, rows, width):
    slots = client.params.slots
    generator = np.random.default_rng(rows)
    values = generator.uniform(-1, 1, rows)
    key, value = generator.uniform(-1, 1, (rows, width)) / 8, generator.uniform(-1, 1, (rows, width)) / 8
    x = engine.load(client.encrypt(values))
    fused = PlaintextMatrix(np.concatenate([key, value], axis=1), copy_columns=(2, width))
    both = x.matmul(fused)
    # one product: of a fresh input it runs a level lower, as every dense product does (drops_a_level_first)
    assert both.packed and both.size == width and both.level == x.level - 2
    assert len(fused.plaintexts(engine.seal, x.ct.parms_id())) <= rows  # one product's diagonals
    copies = (slots - rows + 1) // width  # the copies whose every input slot is right
    expected = np.stack([values @ key, values @ value])[np.arange(copies) % 2].ravel()
    assert np.abs(all_slots(client, engine, both)[: copies * width] - expected).max() < 1e-5
    # one rotation puts the value over its key's copy, no level
    moved = both.rotate(width)
    assert moved.packed and moved.level == both.level
    assert np.abs(all_slots(client, engine, moved)[:width] - values @ value).max() < 1e-5
    with pytest.raises(ValueError, match=f"2 products of {width} columns need {2 * width}, got {width}"):
        PlaintextMatrix(key, copy_columns=(2, width))


# SmolLM2's heads (rotations by 32: one Galois key) and 4 heads of 12 (by 6: two keys, 48 not dividing the slots)
@pytest.mark.parametrize("heads, head_dim", [(9, 64), (4, 12)])
def test_rope_by_rotations_matches_the_dense_rope_product_in_every_slot_it_reads_right(client, engine, heads, head_dim):
    from hf_polyattn.ckks.matmul import RotaryMatrix, copy_slots

    slots, width, half = client.params.slots, heads * head_dim, head_dim // 2
    generator = np.random.default_rng(head_dim)
    angles = generator.uniform(0, 2 * np.pi, head_dim)
    values = generator.uniform(-1, 1, width)
    x = engine.load(client.encrypt(values))
    rope = RotaryMatrix(np.cos(angles), np.sin(angles), heads)
    y = x.matmul(rope)
    expected = np.resize(values @ rope.matrix, slots)  # the dense product: transformers' RoPE per head
    # slot j reads j ± half: right wherever that stays on the input's copies (all but the last half head)
    assert y.level == x.level - 1 and not y.packed
    assert np.abs(all_slots(client, engine, y)[: slots - half] - expected[: slots - half]).max() < 1e-5
    # written into one copy of the packed cache: the mask rides on the slot vectors
    mask = copy_slots(width, slots, 2)
    packed = x.matmul(RotaryMatrix(np.cos(angles), np.sin(angles), heads, output_slots=mask))
    assert packed.packed and np.abs(all_slots(client, engine, packed) - expected * mask).max() < 1e-5
    # position 0: cos 1, sin 0, the identity with no rotation
    assert np.abs(client.decrypt(x.matmul(RotaryMatrix(np.ones(head_dim), np.zeros(head_dim), heads)).serialize()) - values).max() < 1e-5


def test_replicating_refreshes_at_any_level_and_puts_every_slot_right(client, engine):
    from hf_polyattn.ckks.matmul import PlaintextMatrix

    slots, rows = client.params.slots, 48  # 48 does not divide the slots: a product's last outputs are wrong
    generator = np.random.default_rng(4)
    values, weights = generator.uniform(-1, 1, rows), generator.uniform(-1, 1, (rows, rows)) / rows
    y = engine.load(client.encrypt(values)).matmul(PlaintextMatrix(weights))
    expected = np.resize(values @ weights, slots)
    assert np.abs(all_slots(client, engine, y) - expected)[slots - rows + 1 :].max() > 1e-3
    refreshes = engine.profiler.refreshes
    replicated = y.replicated()
    assert engine.profiler.refreshes == refreshes + 1 and replicated.level == engine.top_level
    assert np.abs(all_slots(client, engine, replicated) - expected).max() < 1e-5
    # with levels left it is refreshed all the same
    assert replicated.replicated().level == engine.top_level and engine.profiler.refreshes == refreshes + 2
