"""Refreshing a ciphertext whose levels ran out. TenSEAL has no bootstrapping: a round trip."""

import os
from typing import Protocol

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from .client import untag
from .seal_backend import SealBackend


class Refresher(Protocol):
    """Turns a ciphertext at its last level into a fresh one with the same values (`all_slots`:
    every slot's own value, else its first `size` values repeated over the slots). `backend`:
    the server's SEAL objects (its public context)."""

    def __call__(self, backend: SealBackend, ct: sealapi.Ciphertext, size: int, profiler,
                 all_slots: bool = False) -> sealapi.Ciphertext: ...


class ClientRoundTrip:
    """Masked round trip to the client: the server adds a fresh uniform mask `r ∈ [-R, R]^n` (a
    plaintext, repeated over every slot like the vector itself), the client decrypts and
    re-encrypts `x + r`, the server subtracts `r`. The client never learns `r`, so the mask needs
    no encryption; only fresh ciphertexts ever reach the server.

    A packed ciphertext (`all_slots`: the KV cache's copies hold different positions) travels as
    a vector of every slot, each masked by its own draw; otherwise the vector's values and their
    mask are repeated over the slots, as TenSEAL lays them out.

    Hiding: for values bounded by `|x| ≤ B`, each slot the client sees is within statistical
    distance `B / R` of uniform. With the default `R = 2^16`, `benchmarks/refresh_hiding.py`
    measured 2^-12 to 2^-19 per value at most sites of the embedded model but 2^-7.2 at its second
    layer's reciprocal (intermediates up to 434): a weak hiding, stated as such. `R` costs headroom,
    not precision (`CKKSParameters.mask_bound`: the client refuses values beyond `2R`).
    """

    def __init__(self, client, mask_bound: float | None = None, seed: int | None = None):
        """`client`: anything with `key_id` and `refresh(masked) -> fresh` (a `CKKSClient`, or a
        connection to one). `mask_bound`: `R`, by default the client's `params.mask_bound`.
        `seed`: reproducible masks from a seeded PCG64, for tests only; `None` (the default)
        draws every mask from the OS's CSPRNG (`os.urandom`), which the client cannot predict."""
        self.client = client
        self.mask_bound = client.params.mask_bound if mask_bound is None else mask_bound
        self.rng = np.random.default_rng(seed) if seed is not None else None

    def draw_mask(self, size: int) -> np.ndarray:
        """`size` values uniform in [-R, R): 53 random bits each."""
        if self.rng is not None:
            return self.rng.uniform(-self.mask_bound, self.mask_bound, size)
        bits = np.frombuffer(os.urandom(8 * size), dtype=np.uint64) >> np.uint64(11)
        return (bits * 2.0**-53 * 2.0 - 1.0) * self.mask_bound

    def __call__(self, backend: SealBackend, ct: sealapi.Ciphertext, size: int, profiler,
                 all_slots: bool = False) -> sealapi.Ciphertext:
        carried = backend.slots if all_slots else size
        with profiler.op("refresh"):
            mask = self.draw_mask(carried)
            masked = self.client.key_id + backend.serialize(backend.add_repeated(ct, mask), carried)
            profiler.bytes["to_client"] += len(masked)
            fresh = untag(self.client.refresh(masked), self.client.key_id)
            profiler.bytes["to_server"] += len(fresh)
            profiler.refreshes += 1
            return backend.add_repeated(ts.ckks_vector_from(backend.context, fresh).ciphertext()[0], -mask)
