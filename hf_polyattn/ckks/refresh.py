"""Refreshing a ciphertext whose levels ran out. TenSEAL has no bootstrapping: a round trip."""

from typing import Protocol

import numpy as np
import tenseal as ts

from .client import untag


class Refresher(Protocol):
    """Turns a ciphertext at its last level into a fresh one with the same values."""

    def __call__(self, vector: ts.CKKSVector, profiler) -> ts.CKKSVector: ...


class ClientRoundTrip:
    """Masked round trip to the client: the server adds a fresh uniform mask `r ∈ [-R, R]^n`
    (encrypted with the public key), the client decrypts and re-encrypts `x + r`, the server
    subtracts `r` homomorphically.

    Hiding: for activations bounded by `|x| ≤ B`, each slot the client sees is within
    statistical distance `B / R` of uniform; with the default `R = 2^16` and `B ≈ 2^5` that is
    about `2^-11` per value: a weak hiding, stated as such, limited by CKKS's headroom
    (`R` must stay below `2^(first_bits - scale_bits - 2)`).
    """

    def __init__(self, client, mask_bound: float = 2.0**16, seed: int | None = None):
        self.client = client
        self.mask_bound = mask_bound
        self.rng = np.random.default_rng(seed)

    def __call__(self, vector: ts.CKKSVector, profiler) -> ts.CKKSVector:
        mask = self.rng.uniform(-self.mask_bound, self.mask_bound, vector.size()).tolist()
        context = vector.context()  # the server's public context
        with profiler.op("refresh"):
            # encrypted masks, not plain lists: TenSEAL zero-pads plain lists (issue #462)
            masked = self.client.key_id + (vector + ts.ckks_vector(context, mask)).serialize()
            profiler.bytes["to_client"] += len(masked)
            fresh = untag(self.client.refresh(masked), self.client.key_id)
            profiler.bytes["to_server"] += len(fresh)
            profiler.refreshes += 1
            return ts.ckks_vector_from(context, fresh) - ts.ckks_vector(context, mask)
