"""A whole PolyAttn model evaluated on ciphertexts decrypts to its plaintext polynomial twin."""

import numpy as np
import pytest
import torch

from hf_polyattn.ckks import CKKSClient, CKKSParameters, CKKSServer, ClientRoundTrip, fit_to_ring
from hf_polyattn.ckks.params import PRECISION_LIMIT
from hf_polyattn.ckks.planner import circuit_depth
from hf_polyattn.ckks.session import SecureSession
from tests.helpers import polynomial_tiny, random_ids, tiny_model


@pytest.fixture(scope="module")
def client():
    return CKKSClient()


def check_against_plaintext(model, client, ids, lm_head: str = "server", kv_copies: int | None = None):
    session = SecureSession(model, client=client, mask_seed=0, lm_head=lm_head, kv_copies=kv_copies)
    server = session.server
    predicted = server.plan(ids.shape[1])
    encrypted = session.logits(ids[0]).numpy()
    # the planner, run before any ciphertext, predicted exactly what TenSEAL's levels required
    assert (predicted["levels_consumed"], predicted["refreshes"]) == (server.engine.levels_consumed, server.profiler.refreshes)
    consumed = server.profiler.op_counts
    assert predicted["ops"]["ct×ct"] == consumed["ct×ct mult"] and predicted["ops"]["ct×pt"] == consumed["ct×pt mult"]
    assert sum(predicted["matmuls"].values()) == consumed["pt×ct matmul"]
    with torch.no_grad():
        plain = model(ids).logits[0].double().numpy()
    scale = np.abs(plain).max()
    assert np.abs(encrypted - plain).max() <= 1e-2 * scale, (np.abs(encrypted - plain).max(), scale)
    assert (encrypted.argmax(-1) == plain.argmax(-1)).all()
    return server


def test_one_layer_gqa_model_over_ciphertexts(client):
    model = polynomial_tiny(num_hidden_layers=1)  # 4 query heads over 2 KV heads
    server = check_against_plaintext(model, client, random_ids(1, 4, seed=11))
    assert server.profiler.refreshes > 0
    assert "refresh" in server.profiler.table() and "reciprocal" in server.profiler.table()


def test_a_model_fitted_to_the_ring_over_ciphertexts(client):
    # deeper, narrower approximations for the ring's refreshes: the same plaintext twin, planned exactly
    model = polynomial_tiny(num_hidden_layers=1)
    ids = random_ids(1, 4, seed=11)
    shallowest = SecureSession(model, client=client).server.plan(ids.shape[1])["refreshes"]
    server = check_against_plaintext(fit_to_ring(model, progress=False), client, ids)
    assert server.profiler.refreshes < shallowest


def test_a_packed_kv_cache_over_ciphertexts(client):
    # 3 positions per ciphertext (not filling the slots: sums spread from copy 0), 7 tokens over 3
    # ciphertexts; the packed ones are refreshed in every slot, each slot masked on its own
    model = polynomial_tiny(num_hidden_layers=1)
    server = check_against_plaintext(model, client, random_ids(1, 7, seed=17), kv_copies=3)
    assert [len(keys) for keys in server.circuit.keys] == [3]
    assert server.profiler.op_counts["rotation"] > 0 and server.profiler.refreshes > 0


@pytest.mark.slow
def test_sixteen_tokens_through_the_encrypted_kv_cache(client):
    model = polynomial_tiny(num_hidden_layers=1, max_position_embeddings=32)
    check_against_plaintext(model, client, random_ids(1, 16, seed=13))


@pytest.mark.slow
@pytest.mark.parametrize("form", ["sum", "mean"])
def test_two_layer_model_over_ciphertexts(client, form):
    model = polynomial_tiny(num_hidden_layers=2, attn_form=form, num_key_value_heads=4)
    check_against_plaintext(model, client, random_ids(1, 6, seed=12))


def test_bad_inputs_fail_before_any_long_computation(client):
    model = polynomial_tiny(num_hidden_layers=1)
    public = client.public_context()
    with pytest.raises(ValueError, match="polynomial form"):
        CKKSServer(tiny_model(), public)
    with pytest.raises(ValueError, match="never calibrated"):
        CKKSServer(tiny_model().to_polynomial(check_domain=False), public)
    with pytest.raises(ValueError, match="refreshing is disabled"):
        CKKSServer(model, public, refresher=None)
    with pytest.raises(ValueError, match="secret key"):
        CKKSServer(model, client._context.serialize(save_secret_key=True))
    narrow = tiny_model(attn_eps=1e-9, num_hidden_layers=1)
    narrow.to_polynomial(calibration_data=[random_ids(4, 16, seed=s) for s in range(4)], progress=False)
    with pytest.raises(ValueError, match="beyond what a refresh carries"):
        CKKSServer(narrow, public, ClientRoundTrip(client))
    with pytest.raises(ValueError, match="beyond what this ring holds"):
        CKKSServer(narrow, public, refresher=None)
    # powers up to ~1.3e5: within what the ring holds (2^18), past what a refresh carries (R = 2^16),
    # which the client would refuse mid-sequence
    loose = tiny_model(attn_eps=1e-7, num_hidden_layers=1)
    loose.to_polynomial(calibration_data=[random_ids(4, 16, seed=s) for s in range(4)], progress=False)
    with pytest.raises(ValueError, match="beyond what a refresh carries"):
        CKKSServer(loose, public, ClientRoundTrip(client))
    coarse = CKKSClient(CKKSParameters(levels=4, scale_bits=30, first_bits=49))  # 128-bit, but 2^-12 precision
    with pytest.raises(ValueError, match="too coarse"):
        CKKSServer(model, coarse.public_context(), ClientRoundTrip(coarse))
    session = SecureSession(model, client=client, max_tokens=3)
    with pytest.raises(ValueError, match="max_tokens=3"):
        session.logits(random_ids(1, 4)[0])
    server = session.server
    with pytest.raises(ValueError, match="hidden size 32"):
        server.step(client.encrypt(np.zeros(16)))
    with pytest.raises(ValueError, match="key id differs"):
        server.step(CKKSClient().encrypt(np.zeros(32)))


@pytest.mark.parametrize("form, power", [("sum", 4), ("mean", 6), ("sum", 8)])
def test_reported_depth_is_the_depth_of_the_server_circuit(client, form, power):
    model = polynomial_tiny(num_hidden_layers=2, attn_form=form, attn_power=power, attn_eps=1.0)
    server = CKKSServer(model, client.public_context(), ClientRoundTrip(client))
    resolution = server.precision() / PRECISION_LIMIT
    assert circuit_depth(server) == model.polynomial_report(normaliser_resolution=resolution)["total_depth"]
    # p=8 puts the folded normaliser below what the ring resolves: those layers balance it, a level each
    balanced = sum(block.attention.map_scale != 1.0 for block in server.circuit_plan.blocks)
    assert circuit_depth(server) == model.polynomial_report()["total_depth"] + balanced
    assert (balanced > 0) == (power == 8)


@pytest.mark.parametrize("kv_copies", [None, 1])
def test_shapes_whose_rows_do_not_divide_the_slots_run_by_bsgs(client, kv_copies):
    # d=48: 48 rows do not divide the 4096 slots (TenSEAL's own matmul used to take these products);
    # packed, the projections' input is refreshed first (at whatever level it has) so that 84 copies
    # are right, and the planner counts that refresh
    model = polynomial_tiny(num_hidden_layers=1, hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    server = check_against_plaintext(model, client, random_ids(1, 3, seed=14), kv_copies=kv_copies)
    assert server.circuit_plan.kv_copies == (84 if kv_copies is None else 1)
    assert [len(keys) for keys in server.circuit.keys] == [1 if kv_copies is None else 3]


def test_a_server_past_its_encoding_budget_encodes_again_and_computes_the_same(client):
    model = polynomial_tiny(num_hidden_layers=1, hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    with torch.no_grad():
        embeddings = model.model.embed_tokens(random_ids(1, 2, seed=15))[0].double().numpy()
    outputs, servers = [], []
    for budget in (None, 0):
        server = CKKSServer(model, client.public_context(), ClientRoundTrip(client, seed=0), encoding_budget=budget)
        outputs.append(np.stack([client.decrypt(server.step(client.encrypt(e))) for e in embeddings]))
        servers.append(server)
    kept, unkept = (server.engine.encoding_budget for server in servers)
    assert kept.kept_bytes > 0 and kept.encoded_again == 0
    assert unkept.kept_bytes == 0 and unkept.encoded_again > 0
    assert np.abs(outputs[0] - outputs[1]).max() <= 1e-4 * np.abs(outputs[0]).max()


@pytest.mark.parametrize("lm_head", ["server", "client"])
def test_a_residual_too_large_for_a_refresh_runs_scaled_and_matches_plaintext(client, lm_head):
    # residual values in the hundreds, like SmolLM2's massive activations: a norm's x² would pass
    # the refresh bound R = 2^16, and the client would refuse it mid-sequence
    model = tiny_model(num_hidden_layers=2, attn_eps=1.0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2000)
    model.to_polynomial(calibration_data=[random_ids(4, 16, seed=s) for s in range(4)], progress=False)
    server = check_against_plaintext(model, client, random_ids(1, 3, seed=16), lm_head=lm_head)
    assert server.circuit_plan.residual_scale < 1
    assert server.circuit_plan.hidden_size * server.circuit_plan.final_norm.approximation.domain[1] > client.params.mask_bound


def test_a_norm_whose_newton_step_would_pass_the_refresh_bound_runs_balanced(client):
    # residual values in the hundreds and a tolerance tight enough for a Newton step after the guess:
    # the step would form x/2 = mean(x²)/2 up to ~3e5, past R = 2^16 (the client refuses such a
    # refresh); it runs on c·x instead (c = 1/sqrt(low·high)), √c folded into the next product
    model = tiny_model(num_hidden_layers=2, attn_eps=1.0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(2000)
    model.to_polynomial(calibration_data=[random_ids(4, 16, seed=s) for s in range(4)], progress=False, tolerance=1e-6)
    norm = model.model.layers[0].input_layernorm
    assert 0.5 * norm.inv_sqrt.approximation.domain[1] > client.params.mask_bound
    for lm_head in ("server", "client"):
        server = check_against_plaintext(model, client, random_ids(1, 3, seed=18), lm_head=lm_head)
        sites = [server.circuit_plan.blocks[0].input_norm, server.circuit_plan.final_norm]
        assert all(site.balance < 1 for site in sites)
