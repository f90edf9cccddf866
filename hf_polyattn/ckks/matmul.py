"""Plaintext-matrix × ciphertext products by baby-step giant-step (BSGS) on raw SEAL.

TenSEAL encrypts a vector `x` of `rows` values repeated with period `rows` across all slots (and
its own `matmul` keeps that layout). When `rows` divides the slot count, `x` is exactly periodic,
so `y = x @ W` is `Σ_{k<rows} rot(x, k) ⊙ d_k` with `d_k[j] = W[(j + k) mod rows, j mod cols]`
over every slot `j`: the output comes out periodic with period `cols`, the layout every other
operation expects, with no replication or masking step. BSGS writes `k = g·n1 + b` and
pre-rotates the diagonals (plaintexts) by `g·n1`: `n1 - 1 + n2 - 1 ≈ 2√rows` rotations instead of
one per row, chained by 1 and by `n1` (both in TenSEAL's power-of-two Galois key set). Diagonals
are encoded once per level and kept: the weights are fixed.

`benchmarks/ckks_matmul_methods.py` measured it 5–7× faster than TenSEAL's `matmul` on the
shapes of our models; shapes whose `rows` does not divide the slot count use TenSEAL's.
"""

import math
import os
import shutil
import struct
import tempfile
import weakref

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi


def bsgs_split(rows: int) -> tuple[int, int]:
    """`(n1, n2)` with `n1` a power of two near `sqrt(rows)` and `n1·n2 >= rows`: baby steps
    rotate by 1 up to `n1 - 1`, giant steps by `n1` (`n1 - 1 + n2 - 1` rotations in all)."""
    n1 = 2 ** math.ceil(math.log2(math.sqrt(rows))) if rows > 1 else 1
    return n1, math.ceil(rows / n1)


def require_supported_product(rows: int, cols: int, slots: int) -> None:
    """Refuse a `(rows × cols)` plaintext product that no backend here computes correctly: rows that
    do not divide the slots leave only TenSEAL's `matmul`, which silently deviates once
    `rows + cols > slots + 1` (OpenMined/TenSEAL#504)."""
    if slots % rows and rows + cols > slots + 1:
        raise NotImplementedError(
            f"a {rows}×{cols} product on {slots} slots: {rows} rows do not divide the slots (no baby-step "
            f"giant-step) and TenSEAL's matmul is wrong when rows + cols > slots + 1 (TenSEAL#504); use a larger "
            "ring, or the LM head on the client (lm_head='client')"
        )


class PlaintextMatrix:
    """A fixed `(rows × cols)` weight matrix, with its BSGS diagonals encoded on demand."""

    def __init__(self, matrix):
        self.matrix = np.asarray(matrix, dtype=np.float64)
        if self.matrix.ndim != 2:
            raise ValueError(f"a plaintext matrix must be 2-D, got shape {self.matrix.shape}")
        self.rows, self.cols = self.matrix.shape
        self._lists: list | None = None
        self._encoded: dict[tuple, dict] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def as_lists(self) -> list:
        """Nested lists, for TenSEAL's own `matmul`."""
        if self._lists is None:
            self._lists = self.matrix.tolist()
        return self._lists

    def plaintexts(self, backend: "SealBackend", parms_id) -> dict:
        """`{(g, b): diagonal g·n1 + b, pre-rotated by g·n1}` encoded at `parms_id`'s level."""
        key = tuple(parms_id)
        if key not in self._encoded:
            slots = backend.slots
            n1, _ = bsgs_split(self.rows)
            j = np.arange(slots)
            encoded = {}
            for k in range(self.rows):
                g, b = divmod(k, n1)
                diagonal = self.matrix[(j + k) % self.rows, j % self.cols]
                if diagonal.any():  # a zero diagonal adds nothing (and SEAL refuses its product)
                    encoded[(g, b)] = backend.encode(np.roll(diagonal, g * n1), parms_id)
            self._encoded[key] = encoded
        return self._encoded[key]


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

    def supports(self, matrix: PlaintextMatrix) -> bool:
        return self.slots % matrix.rows == 0

    def encode(self, values: np.ndarray, parms_id, scale: float | None = None) -> sealapi.Plaintext:
        """A plaintext at `parms_id`'s level (zeros after `values`), at `scale` or the global one."""
        plain = sealapi.Plaintext()
        self.encoder.encode(values.tolist(), parms_id, self.scale if scale is None else scale, plain)
        return plain

    def encode_repeated(self, values: np.ndarray, parms_id, scale: float | None = None) -> sealapi.Plaintext:
        """`values` repeated over every slot (`np.resize`): the layout TenSEAL gives a vector."""
        return self.encode(np.resize(values, self.slots), parms_id, scale)

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

    def bsgs(self, ct: sealapi.Ciphertext, plains: dict, rows: int) -> sealapi.Ciphertext:
        """`Σ_g rot(Σ_b rot(ct, b) ⊙ plains[g, b], g·n1)`, rescaled: one level. Baby steps are
        chained rotations by 1, giant steps are taken in Horner order with rotations by `n1`."""
        n1, n2 = bsgs_split(rows)
        baby = self.chained_rotations(ct, n1)
        total = None
        for g in reversed(range(n2)):
            inner = self.multiply_sum((baby[b], plains[(g, b)]) for b in range(n1) if (g, b) in plains)
            if total is not None:
                rotated = self.rotate(total, n1)
                if inner is None:  # every diagonal of this giant step is zero
                    inner = rotated
                else:
                    self.evaluator.add_inplace(inner, rotated)
            total = inner
        if total is None:
            raise ValueError("a plaintext product by an all-zero matrix: drop it from the circuit")
        self.evaluator.rescale_to_next_inplace(total)
        return total

    def matmul(self, vector: ts.CKKSVector, matrix: PlaintextMatrix) -> ts.CKKSVector:
        """`vector @ matrix` by BSGS; one level, like TenSEAL's `matmul`."""
        ct = vector.ciphertext()[0]
        total = self.bsgs(ct, matrix.plaintexts(self, ct.parms_id()), matrix.rows)
        # As TenSEAL does after every rescale: the prime is ≈ the scale, so call the scale exact
        # (otherwise later additions of constants fail on a "scale mismatch").
        total.scale = self.scale
        return self.to_vector(total, matrix.cols)

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
