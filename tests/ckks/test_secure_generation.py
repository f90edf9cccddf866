"""generate(secure=True): the standard generation loop over CKKS, with an encrypted KV cache."""

import copy

import numpy as np
import pytest
import tenseal as ts
import torch

from hf_polyattn.ckks import CKKSClient, SecureSession
from hf_polyattn.ckks.client import KEY_ID_BYTES
from tests.helpers import polynomial_tiny, random_ids, tiny_model


@pytest.fixture(scope="module")
def client():
    return CKKSClient()


@pytest.fixture(scope="module")
def one_layer():
    return polynomial_tiny(num_hidden_layers=1)


def test_secure_greedy_generation_emits_the_plaintext_tokens_through_logits_processors(one_layer, client):
    prompt = random_ids(1, 3, seed=21)
    with torch.no_grad():
        first = one_layer.generate(prompt, max_new_tokens=1, do_sample=False)[0, -1].item()
        # suppressing the plaintext's first choice proves the processors see the decrypted logits
        plain = one_layer.generate(prompt, max_new_tokens=3, do_sample=False, suppress_tokens=[first])
        session = SecureSession(one_layer, client=client, mask_seed=0)
        secure = one_layer.generate(prompt, max_new_tokens=3, do_sample=False, suppress_tokens=[first], session=session)
    assert secure.tolist() == plain.tolist()
    assert first not in secure[0, 3:].tolist()
    assert session.position == 3 + 2  # prompt, then each generated token but the last: one step each
    assert session.prefill_tokens == 3 and "prefill (3 prompt tokens)" in session.report()


@pytest.mark.parametrize("kv_copies", [None, 1])
def test_encrypted_kv_cache_makes_each_token_one_incremental_step(client, kv_copies):
    model = polynomial_tiny(num_hidden_layers=2)
    ids = random_ids(1, 4, seed=5)
    session = SecureSession(model, client=client, mask_seed=0, kv_copies=kv_copies)
    copies = session.server.circuit_plan.kv_copies
    assert copies == (128 if kv_copies is None else 1) and session.server.circuit_plan.copies_fill_slots == (copies > 1)
    matmuls, rows = [], []
    for position in range(ids.shape[1]):
        before = session.profiler.op_counts["pt×ct matmul"]
        rows.append(session.logits(ids[0, position : position + 1]))
        matmuls.append(session.profiler.op_counts["pt×ct matmul"] - before)
    layers = model.config.num_hidden_layers
    fused = session.server.circuit_plan.fuses_key_value
    assert fused == (copies > 1)
    # q, k and v (k and v one product when the cache is packed), o, gate, up, down, RoPE of q and
    # of k per layer, and the LM head
    projections = (9 - fused) * layers + 1
    norms = 2 * layers + 1  # each norm: one sum of squares that leaves the mean in every slot
    # token t projects only itself (tokens < t come from the encrypted cache) and touches each
    # ciphertext of cached keys once (one head sum of q⊙k, spread over the head's slots): no
    # recomputation. Packed, the 4 positions share one ciphertext, and the value is masked into its copy.
    ciphertexts = [-(-(t + 1) // copies) for t in range(ids.shape[1])]
    assert matmuls == [projections + norms + layers * (n + (copies > 1)) for n in ciphertexts]
    with torch.no_grad():
        uncached = model(ids).logits[0].double()  # the plaintext model run without any cache
    incremental = torch.cat(rows)
    assert (incremental - uncached).abs().max() <= 1e-2 * uncached.abs().max()
    assert torch.equal(incremental.argmax(-1), uncached.argmax(-1))


def test_server_in_a_separate_process_sees_only_public_keys_and_ciphertexts(one_layer, client):
    prompt = random_ids(1, 2, seed=31)
    with torch.no_grad():
        plain = one_layer.generate(prompt, max_new_tokens=2, do_sample=False)
    with SecureSession(one_layer, client=client, server="process", keep_transcript=True) as session:
        secure = one_layer.generate(prompt, max_new_tokens=2, do_sample=False, session=session)
        transcript = list(session.server.transcript)
        latency = session.latency()
    assert secure.tolist() == plain.tolist()
    assert latency.refreshes > 0 and latency.counts["reciprocal"] > 0  # the server process's profile came back
    public = ts.context_from(transcript[0])  # the first thing the process got: the public context
    assert not public.is_private()
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(public, transcript[1][KEY_ID_BYTES:]).decrypt()
    fragment = _secret_key_fragment(client)
    assert all(fragment not in message for message in transcript)


def _secret_key_fragment(client) -> bytes:
    """64 bytes from the middle of the serialized secret key polynomial (random-looking data)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "secret"
        client._context.secret_key().data.save(str(path))
        raw = path.read_bytes()
    middle = len(raw) // 2
    return raw[middle : middle + 64]


def test_secure_generation_refuses_what_it_cannot_do(one_layer, client):
    prompt = random_ids(1, 3)
    with pytest.raises(ValueError, match="to_polynomial"):
        tiny_model().generate(prompt, secure=True)
    with pytest.raises(ValueError, match="never calibrated"):
        tiny_model().to_polynomial(check_domain=False).generate(prompt, secure=True)
    with pytest.raises(ValueError, match="one sequence"):
        one_layer.generate(random_ids(2, 3), secure=True)
    with pytest.raises(ValueError, match="unpadded"):
        one_layer.generate(prompt, attention_mask=torch.tensor([[0, 1, 1]]), secure=True)
    with pytest.raises(ValueError, match="num_beams"):
        one_layer.generate(prompt, num_beams=2, secure=True)
    with pytest.raises(ValueError, match="at least one token"):
        one_layer.generate(random_ids(1, 0), secure=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        one_layer.generate(torch.tensor([[1, one_layer.config.vocab_size]]), secure=True)
    with pytest.raises(ValueError, match="num_return_sequences"):
        one_layer.generate(prompt, num_return_sequences=2, do_sample=True, secure=True)
    session = SecureSession(one_layer, client=client, max_tokens=4)
    with pytest.raises(ValueError, match="needs 7 encrypted steps, over the session's max_tokens=4"):
        one_layer.generate(prompt, max_new_tokens=5, session=session)
    assert session.position == 0  # refused before any encrypted step
    with pytest.raises(ValueError, match="lm_head"):
        SecureSession(one_layer, client=client, lm_head="both")
    broken = copy.deepcopy(one_layer)
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) weights in \[.*'lm_head.weight'\]"):
        broken.generate(prompt, secure=True)


def test_client_side_lm_head_gives_the_same_logits(one_layer, client):
    ids = random_ids(1, 2, seed=41)
    server_head = SecureSession(one_layer, client=client, mask_seed=0).logits(ids[0])
    client_head = SecureSession(one_layer, client=client, mask_seed=0, lm_head="client").logits(ids[0])
    with torch.no_grad():
        plain = one_layer(ids).logits[0].double()
    scale = plain.abs().max()
    for encrypted in (server_head, client_head):
        assert (encrypted - plain).abs().max() <= 1e-2 * scale
    assert np.array_equal(server_head.argmax(-1).numpy(), client_head.argmax(-1).numpy())


def test_a_silent_server_process_times_out_and_the_handle_then_refuses_to_go_on(one_layer, client):
    from hf_polyattn.ckks.remote import ServerProcess

    server = ServerProcess(one_layer, client, reply_timeout=0.01)  # far shorter than one encrypted step
    embedding = one_layer.get_input_embeddings().weight[5].detach().double().numpy()
    try:
        assert server.transcript is None  # nothing kept unless asked for
        with pytest.raises(TimeoutError, match="said nothing for 0 s"):
            server.step(client.encrypt(embedding))
        with pytest.raises(RuntimeError, match=r"unusable \(step interrupted by TimeoutError\): reset\(\) opens a new one"):
            server.step(client.encrypt(embedding))
    finally:
        server.close()
