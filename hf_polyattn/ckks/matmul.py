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
shapes of our models; shapes whose `rows` does not divide the slot count use TenSEAL's, within
the size where it is right (`require_supported_product`).
"""

import math

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from .seal_backend import SealBackend


def bsgs_split(rows: int) -> tuple[int, int]:
    """`(n1, n2)` with `n1` a power of two near `sqrt(rows)` and `n1·n2 >= rows`: baby steps
    rotate by 1 up to `n1 - 1`, giant steps by `n1` (`n1 - 1 + n2 - 1` rotations in all)."""
    n1 = 2 ** math.ceil(math.log2(math.sqrt(rows))) if rows > 1 else 1
    return n1, math.ceil(rows / n1)


def require_supported_product(rows: int, cols: int, slots: int) -> None:
    """Refuse a `(rows × cols)` plaintext product that no backend here computes correctly: rows that
    do not divide the slots leave only TenSEAL's `matmul`, which silently deviates once
    `rows + cols > slots + 1` (OpenMined/TenSEAL#504)."""
    if not supports(rows, slots) and rows + cols > slots + 1:
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

    def plaintexts(self, backend: SealBackend, parms_id) -> dict:
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


def supports(rows: int, slots: int) -> bool:
    """Whether BSGS takes a `rows`-row matrix: `rows` divides the slot count (the vector is then periodic)."""
    return slots % rows == 0


def bsgs(backend: SealBackend, ct: sealapi.Ciphertext, plains: dict, rows: int) -> sealapi.Ciphertext:
    """`Σ_g rot(Σ_b rot(ct, b) ⊙ plains[g, b], g·n1)`, rescaled: one level. Baby steps are
    chained rotations by 1, giant steps are taken in Horner order with rotations by `n1`."""
    n1, n2 = bsgs_split(rows)
    baby = backend.chained_rotations(ct, n1)
    total = None
    for g in reversed(range(n2)):
        inner = backend.multiply_sum((baby[b], plains[(g, b)]) for b in range(n1) if (g, b) in plains)
        if total is not None:
            rotated = backend.rotate(total, n1)
            if inner is None:  # every diagonal of this giant step is zero
                inner = rotated
            else:
                backend.evaluator.add_inplace(inner, rotated)
        total = inner
    if total is None:
        raise ValueError("a plaintext product by an all-zero matrix: drop it from the circuit")
    backend.evaluator.rescale_to_next_inplace(total)
    return total


def matmul(backend: SealBackend, vector: ts.CKKSVector, matrix: PlaintextMatrix) -> ts.CKKSVector:
    """`vector @ matrix` by BSGS; one level, like TenSEAL's `matmul`."""
    ct = vector.ciphertext()[0]
    total = bsgs(backend, ct, matrix.plaintexts(backend, ct.parms_id()), matrix.rows)
    # As TenSEAL does after every rescale: the prime is ≈ the scale, so call the scale exact
    # (otherwise later additions of constants fail on a "scale mismatch").
    total.scale = backend.scale
    return backend.to_vector(total, matrix.cols)
