"""Raw SEAL under TenSEAL: encoding, rotations, plaintext products, and TenSEAL's serialized form.

TenSEAL offers vectors; the baby-step giant-step products (`matmul.py`), the client's seeded
symmetric encryptions and the refresh masks need SEAL's own objects for one (public) context.
SEAL serialises to paths only, so ciphertexts pass through a private anonymous file (`_scratch`).
"""

import os
import shutil
import struct
import tempfile
import weakref

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi


class SealBackend:
    """Raw SEAL objects for one (public) TenSEAL context."""

    def __init__(self, context: ts.Context):
        self.context = context
        data = context.seal_context().data
        self.encoder = sealapi.CKKSEncoder(data)
        self.evaluator = sealapi.Evaluator(data)
        self.galois_keys = context.galois_keys().data
        self.slots = self.encoder.slot_count()
        self.scale = context.global_scale
        self._scratch = _private_scratch_path(self)

    def encode(self, values: np.ndarray, parms_id, scale: float | None = None) -> sealapi.Plaintext:
        """A plaintext at `parms_id`'s level (zeros after `values`), at `scale` or the global one."""
        plain = sealapi.Plaintext()
        self.encoder.encode(values.tolist(), parms_id, self.scale if scale is None else scale, plain)
        return plain

    def encode_repeated(self, values: np.ndarray, parms_id, scale: float | None = None) -> sealapi.Plaintext:
        """`values` repeated over every slot (`np.resize`): the layout TenSEAL gives a vector."""
        return self.encode(np.resize(values, self.slots), parms_id, scale)

    def at_last_level(self, ct: sealapi.Ciphertext) -> sealapi.Ciphertext:
        """`ct` mod-switched to the last level (`ct` itself if it is there; the values and the scale
        are unchanged)."""
        last = self.context.seal_context().data.last_parms_id()
        if tuple(ct.parms_id()) == tuple(last):
            return ct
        lowered = sealapi.Ciphertext()
        self.evaluator.mod_switch_to(ct, last, lowered)
        return lowered

    def rotate(self, ct: sealapi.Ciphertext, step: int) -> sealapi.Ciphertext:
        rotated = sealapi.Ciphertext()
        self.evaluator.rotate_vector(ct, step, self.galois_keys, rotated)
        return rotated

    def chained_rotations(self, ct: sealapi.Ciphertext, count: int) -> list[sealapi.Ciphertext]:
        """`rot(ct, k)` for `k < count`, each from the previous by one step: one Galois key."""
        rotations = [ct]
        for _ in range(count - 1):
            rotations.append(self.rotate(rotations[-1], 1))
        return rotations

    def multiply_sum(self, terms) -> sealapi.Ciphertext:
        """`Σ ct ⊙ plain` over `(ct, plain)` pairs, not yet rescaled."""
        total = None
        for ct, plain in terms:
            product = sealapi.Ciphertext()
            self.evaluator.multiply_plain(ct, plain, product)
            if total is None:
                total = product
            else:
                self.evaluator.add_inplace(total, product)
        return total

    def add_plain(self, vector: ts.CKKSVector, values: np.ndarray) -> sealapi.Ciphertext:
        """`vector + values` with `values` (one per slot of the vector) repeated over every slot,
        the layout TenSEAL gives the vector itself (a plain list would be zero-padded: #462)."""
        ct = vector.ciphertext()[0]
        self.evaluator.add_plain_inplace(ct, self.encode_repeated(values, ct.parms_id(), ct.scale))
        return ct

    def serialize(self, ct, size: int) -> bytes:
        """TenSEAL's serialized form of a `size`-value vector held in `ct` (CKKSVectorProto:
        1 = size, 2 = SEAL ciphertext bytes, 3 = TenSEAL's initial scale, the context's global
        scale for every vector this package makes): TenSEAL has no constructor from a SEAL
        ciphertext. `ct` may also be the `Serializable` of a symmetric encryption, which SEAL
        writes as its first polynomial plus the seed of the second (half the bytes; any context
        loads it back whole)."""
        ct.save(self._scratch)
        with open(self._scratch, "rb") as handle:
            payload = handle.read()
        message = (
            b"\x0a" + _varint(len(_varint(size))) + _varint(size)
            + b"\x12" + _varint(len(payload)) + payload
            + b"\x19" + struct.pack("<d", self.scale)
        )
        return message

    def to_vector(self, ct: sealapi.Ciphertext, size: int) -> ts.CKKSVector:
        """A TenSEAL vector of `size` values held in `ct`."""
        return ts.ckks_vector_from(self.context, self.serialize(ct, size))


def _private_scratch_path(owner) -> str:
    """A path SEAL's `save` (it writes to paths only) can write to that no other process can open:
    an anonymous in-memory file (Linux memfd, no name in any folder, gone with the process), else a
    file in a fresh 0700 folder with an unpredictable name, removed with `owner`."""
    if hasattr(os, "memfd_create"):
        descriptor = os.memfd_create("polyattn-ciphertext", os.MFD_CLOEXEC)
        weakref.finalize(owner, os.close, descriptor)
        return f"/proc/self/fd/{descriptor}"
    folder = tempfile.mkdtemp(prefix="polyattn-")
    weakref.finalize(owner, shutil.rmtree, folder, True)
    return os.path.join(folder, "ciphertext.bin")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
