"""Raw SEAL under TenSEAL: the server's arithmetic, encoding, rotations, and TenSEAL's serialized form.

TenSEAL offers vectors, but a vector cannot be made from a SEAL ciphertext without serializing
it and parsing it back (~1.5 ms at N=8192), which every product and refresh would pay. So the
server computes on SEAL's own ciphertexts (`Cipher`), with TenSEAL's conventions: products are
relinearised and rescaled at once, and operands of two levels meet at the lower one. A plaintext
product comes back at exactly the global scale (`encode_factor`); a ct×ct product's `scale²/prime`
is called the global scale, as TenSEAL does (the prime is ≈ the scale). TenSEAL's
format is kept on the wire (`serialize`, `load`). SEAL serialises to paths only, so ciphertexts
pass through a private anonymous file (`_scratch`).
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
        self._data = data
        self._relin_keys = None
        self._primes: dict[tuple, int] = {}
        self._scratch = _private_scratch_path(self)

    # -- arithmetic on ciphertexts (each result a new ciphertext: the operands are never changed) --

    def level(self, ct: sealapi.Ciphertext) -> int:
        """Multiplications `ct` can still take (its index in the modulus chain)."""
        return self._data.get_context_data(ct.parms_id()).chain_index()

    def _lowered(self, ct: sealapi.Ciphertext, parms_id) -> sealapi.Ciphertext:
        """`ct` mod-switched to `parms_id`'s level (`ct` itself if it is there)."""
        if tuple(ct.parms_id()) == tuple(parms_id):
            return ct
        lowered = sealapi.Ciphertext()
        self.evaluator.mod_switch_to(ct, parms_id, lowered)
        return lowered

    def lowered(self, ct: sealapi.Ciphertext) -> sealapi.Ciphertext:
        """`ct` one level down (a prime dropped; the values and the scale unchanged)."""
        lowered = sealapi.Ciphertext()
        self.evaluator.mod_switch_to_next(ct, lowered)
        return lowered

    def _at_one_level(self, a: sealapi.Ciphertext, b: sealapi.Ciphertext) -> tuple:
        """`a` and `b` at the lower of their levels (the higher one mod-switched, as a copy)."""
        if self.level(a) > self.level(b):
            return self._lowered(a, b.parms_id()), b
        return a, self._lowered(b, a.parms_id())

    def rescaled(self, ct: sealapi.Ciphertext) -> sealapi.Ciphertext:
        """`ct` rescaled in place (a level), its scale the global one; `ct` itself."""
        self.evaluator.rescale_to_next_inplace(ct)
        # exact after a plaintext product (`encode_factor`); after a ct×ct product `scale²/prime`,
        # called the global scale as TenSEAL does (the prime is ≈ the scale)
        ct.scale = self.scale
        return ct

    def multiply(self, a: sealapi.Ciphertext, b: sealapi.Ciphertext) -> sealapi.Ciphertext:
        """`a ⊙ b`, relinearised and rescaled: one level."""
        if self._relin_keys is None:
            self._relin_keys = self.context.relin_keys().data
        a, b = self._at_one_level(a, b)
        product = sealapi.Ciphertext()
        self.evaluator.multiply(a, b, product)
        self.evaluator.relinearize_inplace(product, self._relin_keys)
        return self.rescaled(product)

    def multiply_scalar(self, ct: sealapi.Ciphertext, value: float) -> sealapi.Ciphertext:
        """`value · ct`, rescaled: one level. `value` must not encode to 0 (SEAL refuses a product
        that is transparent)."""
        plain = sealapi.Plaintext()
        self.encoder.encode(float(value), ct.parms_id(), float(self.rescale_prime(ct.parms_id())), plain)
        product = sealapi.Ciphertext()
        self.evaluator.multiply_plain(ct, plain, product)
        return self.rescaled(product)

    def add(self, a: sealapi.Ciphertext, b: sealapi.Ciphertext, subtract: bool = False) -> sealapi.Ciphertext:
        """`a + b` (or `a − b`) at the lower of their levels: no level."""
        a, b = self._at_one_level(a, b)
        total = sealapi.Ciphertext()
        (self.evaluator.sub if subtract else self.evaluator.add)(a, b, total)
        return total

    def add_scalar(self, ct: sealapi.Ciphertext, value: float) -> sealapi.Ciphertext:
        """`ct + value` in every slot: no level."""
        plain = sealapi.Plaintext()
        self.encoder.encode(float(value), ct.parms_id(), ct.scale, plain)
        total = sealapi.Ciphertext()
        self.evaluator.add_plain(ct, plain, total)
        return total

    def negate(self, ct: sealapi.Ciphertext) -> sealapi.Ciphertext:
        negated = sealapi.Ciphertext()
        self.evaluator.negate(ct, negated)
        return negated

    def add_repeated(self, ct: sealapi.Ciphertext, values: np.ndarray) -> sealapi.Ciphertext:
        """`ct + values`, `values` repeated over every slot (`np.resize`: TenSEAL's layout of a
        vector of that many values): no level."""
        total = sealapi.Ciphertext()
        self.evaluator.add_plain(ct, self.encode_repeated(values, ct.parms_id(), ct.scale), total)
        return total

    def rescale_prime(self, parms_id) -> int:
        """The prime a rescale at `parms_id`'s level divides by (read from SEAL's own rescale of
        an encryption of zeros: the scale it leaves is the old one over that prime)."""
        key = tuple(parms_id)
        if key not in self._primes:
            zeros = self._lowered(ts.ckks_vector(self.context, [0.0]).ciphertext()[0], parms_id)
            before = zeros.scale
            self.evaluator.rescale_to_next_inplace(zeros)
            self._primes[key] = round(before / zeros.scale)
        return self._primes[key]

    def encode_factor(self, values: np.ndarray, parms_id) -> sealapi.Plaintext:
        """A plaintext that multiplies a ciphertext at `parms_id`'s level, encoded at the scale of
        the prime its product's rescale divides by: the product comes back at exactly the global
        scale. (At the global scale it would come back at `scale²/prime`, which calling the
        global scale, as TenSEAL does, makes a bias of `scale/prime − 1` per product: ~7e-7 for
        one of this ring's 40-bit primes, which the reciprocals of small normalisers amplify.)"""
        return self.encode(values, parms_id, self.rescale_prime(parms_id))

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
        return self._lowered(ct, self._data.last_parms_id())

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
