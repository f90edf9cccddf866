"""Driving a client/server pair over a token sequence (the loop secure generation builds on)."""

import numpy as np
import torch

from .client import CKKSClient
from .server import CKKSServer


@torch.no_grad()
def encrypted_logits(model, client: CKKSClient, server: CKKSServer, input_ids: torch.Tensor) -> np.ndarray:
    """Logits of every position of one sequence, each forward step evaluated on ciphertexts.

    The client embeds and encrypts each token, the server runs one incremental step over its
    encrypted KV cache, the client decrypts. Returns `(length, vocab)` float64.
    """
    if input_ids.ndim == 2:
        if input_ids.shape[0] != 1:
            raise ValueError("encrypted evaluation takes one sequence at a time")
        input_ids = input_ids[0]
    if len(input_ids) > server.max_tokens:
        raise ValueError(f"{len(input_ids)} tokens is longer than the server's max_tokens={server.max_tokens}")
    server.reset()
    embeddings = model.get_input_embeddings()(input_ids).double().numpy()
    rows = []
    for embedding in embeddings:
        with server.profiler.op("encrypt"):
            ciphertext = client.encrypt(embedding)
        server.profiler.bytes["to_server"] += len(ciphertext)
        answer = server.step(ciphertext)
        server.profiler.bytes["to_client"] += len(answer)
        with server.profiler.op("decrypt"):
            rows.append(client.decrypt(answer))
    return np.stack(rows)
