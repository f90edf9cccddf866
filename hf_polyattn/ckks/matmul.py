"""Plaintext-matrix × ciphertext products by baby-step giant-step (BSGS) on raw SEAL, for every shape.

TenSEAL encrypts a vector `x` of `rows` values repeated across all slots (`np.resize`: period
`rows`, the last copy cut short when `rows` does not divide the slot count). Its `matmul` computes
`y = Σ_{k<rows} rot(x, k) ⊙ d_k` with `d_k[j] = W[(j + k) mod rows, j mod cols]` over every slot
`j`. BSGS computes the same sum with the same diagonals: write `k = g·n1 + b` and pre-rotate the
diagonals (plaintexts) by `g·n1`; rotations are exact on the cyclic slots, so the result is
TenSEAL's slot for slot, with `n1 - 1 + n2 - 1 ≈ 2√rows` rotations instead of one per row, chained
by 1 and by `n1` (both in TenSEAL's power-of-two Galois key set). Diagonals are encoded once per
level and kept: the weights are fixed.

Where `rows` divides the slots, `x` is exactly periodic and `y` is right in every slot (period
`cols`). Elsewhere output slot `j < cols` reads `x` at slots `j + k`, which wrap past the last
(cut) copy once `rows + cols > slots + 1`: `require_supported_product` refuses those shapes, the
bound TenSEAL's own `matmul` silently breaks (OpenMined/TenSEAL#504). Products whose rows do not
divide the slots (SmolLM2's 576 and 1536) used to go to TenSEAL's `matmul`, 5–12× slower
(`benchmarks/ckks_matmul_methods.py`).
"""

import math
import os
import weakref
from typing import NamedTuple

import numpy as np
import tenseal.sealapi as sealapi

from .seal_backend import SealBackend


def bsgs_split(rows: int) -> tuple[int, int]:
    """`(n1, n2)` with `n1` a power of two near `sqrt(rows)` and `n1·n2 >= rows`: baby steps
    rotate by 1 up to `n1 - 1`, giant steps by `n1` (`n1 - 1 + n2 - 1` rotations in all)."""
    n1 = 2 ** math.ceil(math.log2(math.sqrt(rows))) if rows > 1 else 1
    return n1, math.ceil(rows / n1)


def require_supported_product(rows: int, cols: int, slots: int) -> None:
    """Refuse a `(rows × cols)` plaintext product the replicated layout gets wrong: rows that do not
    divide the slots leave `x` periodic only up to its last, cut copy, and the product's output
    reads past it once `rows + cols > slots + 1` (where TenSEAL's `matmul` silently deviates,
    OpenMined/TenSEAL#504)."""
    if not periodic(rows, slots) and rows + cols > slots + 1:
        raise NotImplementedError(
            f"a {rows}×{cols} product on {slots} slots: {rows} rows do not divide the slots, and the replicated "
            f"layout is wrong when rows + cols > slots + 1 (TenSEAL#504); use a larger ring, or the LM head on the "
            "client (lm_head='client')"
        )


def available_memory_bytes() -> int:
    """Memory the system can still give this process (Linux `MemAvailable`, else free pages)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class _Kept(NamedTuple):
    """Diagonals an `EncodingBudget` counts: whose (a weak reference), at which level, their bytes."""

    owner: weakref.ref
    key: tuple
    nbytes: int
    diagonal_bytes: float


class EncodingBudget:
    """How many bytes of encoded diagonals the matrices of one engine may keep.

    A plaintext at N=8192 with three primes is 196 KB (131 KB with two, 66 KB with one: a
    diagonal is encoded at the level of the ciphertext it multiplies; on the default ring every
    dense product multiplies at two, `symbolic.drops_a_level_first`), so one SmolLM2 layer's
    diagonals take ~0.6 GB and all 30 layers (17 GB) do not fit in a 23 GB machine's memory.
    What does not fit is encoded again at each use, at about the same time per diagonal whatever
    its level (~0.5 ms). So the budget keeps the most diagonals it can: the smallest plaintexts first. A matrix whose
    diagonals are smaller than some kept ones takes their room (they are encoded again at their
    next use); otherwise first come, first kept. Not an LRU: a step walks the layers in the same
    order every token, and an LRU smaller than that cycle evicts every matrix just before its
    next use.

    Args:
        max_bytes: the budget; default half of the memory available when it is made.
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = available_memory_bytes() // 2 if max_bytes is None else int(max_bytes)
        if self.max_bytes < 0:
            raise ValueError(f"an encoding budget cannot be negative, got {max_bytes}")
        self.kept_bytes = 0
        self.encoded_again = 0  # diagonals encoded for a single product (past the budget)
        self._kept: dict[tuple, _Kept] = {}  # by (id(matrix), level key)

    def keep(self, matrix: "PlaintextMatrix", key: tuple, nbytes: int, diagonals: int) -> bool:
        """Whether `matrix` may keep `nbytes` of `diagonals` encoded at `key` (and, if so, counts
        them), making room by dropping kept matrices of larger diagonals where that is enough."""
        size = nbytes / max(diagonals, 1)
        if self.kept_bytes + nbytes > self.max_bytes:
            larger = sorted((kept for kept in self._kept.values() if kept.diagonal_bytes > size),
                            key=lambda kept: -kept.diagonal_bytes)
            if self.kept_bytes - sum(kept.nbytes for kept in larger) + nbytes > self.max_bytes:
                return False
            for kept in larger:
                if self.kept_bytes + nbytes <= self.max_bytes:
                    break
                owner = kept.owner()
                if owner is not None:
                    owner.forget(kept.key)  # calls release
        self.kept_bytes += nbytes
        self._kept[(id(matrix), key)] = _Kept(weakref.ref(matrix), key, nbytes, size)
        weakref.finalize(matrix, self.release, id(matrix), key)  # a dropped matrix gives its bytes back
        return True

    def release(self, matrix_id: int, key: tuple) -> None:
        """What the matrix `matrix_id` kept at `key` is free again (forgotten, or the matrix is gone)."""
        kept = self._kept.pop((matrix_id, key), None)
        if kept is not None:
            self.kept_bytes -= kept.nbytes


class PlaintextMatrix:
    """A fixed `(rows × cols)` weight matrix, with its BSGS diagonals encoded on demand.

    `reusable=False`: a matrix used for one product (a position's RoPE-folded projection) is
    encoded for that product and never kept, so it spends no encoding budget.
    `output_slots`: a 0/1 mask over the slots; the product writes those slots only (every other
    slot is 0), at no cost: each diagonal is masked before it is encoded (the packed KV cache
    puts a position's key in one copy so).
    `copy_columns`: `(copies, cols)` to lay out `matrix` (`rows × copies·cols`) as `copies` products
    of `cols` columns taking turns copy by copy: slot `j` computes column `j mod cols` of product
    `(j // cols) mod copies`, at the cost of one product (the same `rows` diagonals). The output is
    packed (its copies hold different values). E.g. the key in even copies and the value in odd.
    """

    def __init__(self, matrix, reusable: bool = True, output_slots: np.ndarray | None = None,
                 copy_columns: tuple[int, int] | None = None):
        self.reusable = reusable
        self.matrix = np.asarray(matrix, dtype=np.float64)
        if self.matrix.ndim != 2:
            raise ValueError(f"a plaintext matrix must be 2-D, got shape {self.matrix.shape}")
        self.rows, self.cols = self.matrix.shape
        self.copy_columns = copy_columns
        if copy_columns is not None:
            copies, self.cols = copy_columns
            if copies * self.cols != self.matrix.shape[1]:
                raise ValueError(f"{copies} products of {self.cols} columns need {copies * self.cols}, got {self.matrix.shape[1]}")
        self.output_slots = output_slots
        self._encoded: dict[tuple, dict] = {}
        self._budget: EncodingBudget | None = None  # where its kept diagonals are counted

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def cost_key(self) -> tuple[int, ...]:
        """What prices its product (`costs.OpCosts.matmul`): the shape."""
        return self.shape

    @property
    def packs(self) -> bool:
        """Whether its output's copies hold different values (a refresh must carry every slot)."""
        return self.output_slots is not None or self.copy_columns is not None

    def slot_columns(self, slots: int) -> np.ndarray:
        """The column of `matrix` each output slot computes."""
        j = np.arange(slots)
        if self.copy_columns is None:
            return j % self.cols
        copies, cols = self.copy_columns
        return j % cols + cols * (j // cols % copies)

    def plaintexts(self, backend: SealBackend, parms_id, budget: EncodingBudget | None = None) -> dict:
        """`{(g, b): diagonal g·n1 + b, pre-rotated by g·n1}` encoded at `parms_id`'s level; kept
        for the next product while `budget` allows (always, without one)."""
        key = tuple(parms_id)
        if key in self._encoded:
            return self._encoded[key]
        slots = backend.slots
        n1, _ = bsgs_split(self.rows)
        j, columns = np.arange(slots), self.slot_columns(slots)
        encoded = {}
        for k in range(self.rows):
            g, b = divmod(k, n1)
            diagonal = self.matrix[(j + k) % self.rows, columns]
            if self.output_slots is not None:
                diagonal = diagonal * self.output_slots
            if diagonal.any():  # a zero diagonal adds nothing (and SEAL refuses its product)
                encoded[(g, b)] = backend.encode_factor(np.roll(diagonal, g * n1), parms_id)
        if not self.reusable:
            return encoded
        nbytes = sum(plain.coeff_count() for plain in encoded.values()) * 8
        if budget is None or budget.keep(self, key, nbytes, len(encoded)):
            self._encoded[key] = encoded
            self._budget = budget
        else:
            budget.encoded_again += len(encoded)
        return encoded

    def forget(self, key: tuple) -> None:
        """Drop the diagonals kept at `key` (a level): its budget needs the room for smaller ones."""
        if self._encoded.pop(key, None) is not None and self._budget is not None:
            self._budget.release(id(self), key)


class BlockSumMatrix(PlaintextMatrix):
    """`factor ×` the block-diagonal matrix of ones (`width/block` blocks of `block × block`): the
    values of each block summed and the sum spread over the block's slots (attention's head sums;
    with `block = width`, a norm's sum of squares in every slot). Computed by rotations
    (`block_sum`): about `2·log2(block)` of them and one plaintext product, where a baby-step
    giant-step product of the same matrix takes `~2·sqrt(width)` rotations and up to `width`
    products (the head sums are paid once per cached key in attention)."""

    def __init__(self, width: int, block: int, factor: float = 1.0):
        if block < 1 or width % block:
            raise ValueError(f"a block sum needs a block dividing the width, got {block} and {width}")
        super().__init__(np.kron(np.eye(width // block), np.ones((block, block))) * factor)
        self.block, self.factor = block, factor
        self._masks: dict[tuple, sealapi.Plaintext] = {}

    @property
    def cost_key(self) -> tuple[int, ...]:
        return (*self.shape, self.block)

    def mask(self, backend: SealBackend, parms_id) -> sealapi.Plaintext:
        """`factor` at each block's first slot, 0 elsewhere (everywhere for one block), repeated
        like the vector: one plaintext. A block starting too close to the last slot for its
        window is left out: its sum would wrap into the first slots, and the spread carries
        what sits before slot 0 (the last slots) into the first block."""
        key = tuple(parms_id)
        if key not in self._masks:
            slots = backend.slots
            if self.block == self.rows:
                values = np.full(slots, self.factor)
            else:
                position = np.arange(slots)
                starts = (position % self.rows % self.block == 0) & (position + self.block <= slots)
                values = np.where(starts, self.factor, 0.0)
            self._masks[key] = backend.encode_factor(values, parms_id)
        return self._masks[key]


def block_sum(backend: SealBackend, ct: sealapi.Ciphertext, matrix: BlockSumMatrix) -> sealapi.Ciphertext:
    """`vector @ matrix` for a block-sum matrix, one level: window sums `Σ_{i<block} x[j+i]` by
    rotations (at each block's first slot that is the block's sum), masked to those slots (times
    `factor`), then spread back over each block by the same sums rotating the other way. With one
    block every slot's window is the whole sum: the mask is `factor` everywhere and there is
    nothing to spread. It reads the same slots a product reads (`j + i`, `i < rows`), so it is
    right wherever the baby-step giant-step product is (`require_supported_product`)."""
    masked = _masked(backend, _window_sum(backend, ct, matrix.block, 1), matrix.mask(backend, ct.parms_id()))
    return masked if matrix.block == matrix.rows else _window_sum(backend, masked, matrix.block, -1)


def _window_sum(backend: SealBackend, ct: sealapi.Ciphertext, length: int, direction: int) -> sealapi.Ciphertext:
    """`Σ_{i<length} rot(ct, direction·i)`: sums of 1, 2, 4, … slots by doubling, then the binary
    digits of `length` joined (`floor(log2 length) + popcount(length) - 1` rotations,
    `symbolic.window_sum_rotations`). `direction` is the stride (negative: the other way)."""
    evaluator = backend.evaluator
    doubled = [ct]  # doubled[k]: the window of 2^k slots
    while 2 ** len(doubled) <= length:
        window = backend.rotate(doubled[-1], direction * 2 ** (len(doubled) - 1))  # a new ciphertext
        evaluator.add_inplace(window, doubled[-1])
        doubled.append(window)
    result, offset = None, 0
    for k in reversed(range(len(doubled))):  # largest window first; none is read twice
        if length >> k & 1:
            term = doubled[k] if offset == 0 else backend.rotate(doubled[k], direction * offset)
            if result is None:
                result = term  # `ct` itself only when length is 1, and then nothing is added to it
            else:
                evaluator.add_inplace(result, term)
            offset += 2**k
    return result


def rotate_sum(backend: SealBackend, ct: sealapi.Ciphertext, stride: int, count: int) -> sealapi.Ciphertext:
    """`Σ_{i<count} rot(ct, i·stride)`, no level: the packed KV cache's sum over its copies."""
    return _window_sum(backend, ct, count, stride)


def rope_matrix(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """`R` with `x @ R = x·cos + rotate_half(x)·sin` for one head (transformers' Llama RoPE)."""
    dim = cos.shape[0]
    half = dim // 2
    rotation = np.diag(cos)
    for i in range(half):
        rotation[i + half, i] = -sin[i]
        rotation[i, i + half] = sin[i + half]
    return rotation


class RotaryMatrix(PlaintextMatrix):
    """RoPE of one position on `heads` heads of `len(cos)` values: `x·cos + rotate_half(x)·sin`, by
    two rotations (by ±head_dim/2, the halves each value pairs with) and three slot-wise plaintext
    products: one level, where the dense `(width × width)` product would encode `width` diagonals
    again for every position (RoPE depends on it). `output_slots`: written only there (the packed
    KV cache's copy), at no cost: the three slot vectors carry the mask."""

    def __init__(self, cos: np.ndarray, sin: np.ndarray, heads: int, output_slots: np.ndarray | None = None):
        cos, sin = np.asarray(cos, dtype=np.float64), np.asarray(sin, dtype=np.float64)
        if cos.shape != sin.shape or cos.ndim != 1 or cos.shape[0] % 2:
            raise ValueError(f"RoPE needs cos and sin of one even head dimension, got {cos.shape} and {sin.shape}")
        super().__init__(np.kron(np.eye(heads), rope_matrix(cos, sin)), reusable=False, output_slots=output_slots)
        self.head_dim = cos.shape[0]
        self._masks: dict[tuple, list] = {}

    @property
    def cost_key(self) -> tuple:
        return (*self.shape, "rotary", self.head_dim)

    def slot_vectors(self, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What multiplies `x`, `rot(x, half)` (slot `j` reads `j + half`) and `rot(x, -half)` in
        each slot of the replicated layout: the diagonal of `R`, its entries pairing a value with the
        one half a head after it (first halves, `-sin`) and before it (second halves, `sin`)."""
        half = self.head_dim // 2
        local = np.arange(slots) % self.rows
        first = local % self.head_dim < half
        paired = self.matrix[np.where(first, local + half, local - half), local]  # the same head's other half
        vectors = (self.matrix[local, local], np.where(first, paired, 0.0), np.where(first, 0.0, paired))
        if self.output_slots is not None:
            vectors = tuple(v * self.output_slots for v in vectors)
        return vectors

    def masks(self, backend: SealBackend, parms_id) -> list:
        """`[(rotation, plaintext)]` of the nonzero slot vectors (at position 0 RoPE is the identity:
        no rotation term; SEAL refuses a product by an all-zero plaintext)."""
        key = tuple(parms_id)
        if key not in self._masks:
            half = self.head_dim // 2
            self._masks[key] = [(step, backend.encode_factor(v, parms_id))
                                for step, v in zip((0, half, -half), self.slot_vectors(backend.slots)) if v.any()]
        return self._masks[key]


def rotary(backend: SealBackend, ct: sealapi.Ciphertext, matrix: RotaryMatrix) -> sealapi.Ciphertext:
    """`ct @ matrix` for RoPE: `Σ rot(x, step) ⊙ mask`, rescaled (one level, two rotations)."""
    total = backend.multiply_sum((ct if step == 0 else backend.rotate(ct, step), plain)
                                 for step, plain in matrix.masks(backend, ct.parms_id()))
    return backend.rescaled(total)


def copy_slots(width: int, slots: int, copy: int) -> np.ndarray:
    """1 on the slots of copy `copy` of a `width`-value vector repeated over `slots`, 0 elsewhere."""
    return (np.arange(slots) // width == copy).astype(np.float64)


class CopyMask(PlaintextMatrix):
    """The identity on copy `copy` of a `width`-value vector repeated over the slots, 0 elsewhere:
    one plaintext product (a level), where the general product would take `width` diagonals.
    The packed KV cache puts a position's value in its copy so."""

    def __init__(self, width: int, slots: int, copy: int):
        if not 0 <= copy < slots // width:
            raise ValueError(f"{slots} slots hold {slots // width} whole copies of {width} values, not copy {copy}")
        self.reusable, self.matrix, self.output_slots, self.copy_columns = True, None, None, None
        self.rows = self.cols = width
        self.slots, self.copy = slots, copy
        self._masks: dict[tuple, sealapi.Plaintext] = {}

    @property
    def cost_key(self) -> tuple:
        return (*self.shape, "copy_mask")

    def mask_values(self) -> np.ndarray:
        return copy_slots(self.rows, self.slots, self.copy)

    def mask(self, backend: SealBackend, parms_id) -> sealapi.Plaintext:
        key = tuple(parms_id)
        if key not in self._masks:
            self._masks[key] = backend.encode_factor(self.mask_values(), parms_id)
        return self._masks[key]


class CopySpread(PlaintextMatrix):
    """Copy 0 of a `width`-value vector spread over every slot in the replicated layout (TenSEAL's:
    whole copies, then the cut one): copy 0 masked (and, for the cut copy, its first values), then
    rotated into place. One level; what the other copies held is dropped. The packed KV cache's
    sums over copies need it when the copies do not fill the slots: only copy 0 holds the whole
    sum there (the others' windows wrap past the cut copy)."""

    def __init__(self, width: int, slots: int):
        if slots // width < 1:
            raise ValueError(f"a width of {width} does not fit in {slots} slots")
        self.reusable, self.matrix, self.output_slots, self.copy_columns = True, None, None, None
        self.rows = self.cols = width
        self.slots = slots
        self._masks: dict[tuple, tuple] = {}

    @property
    def cost_key(self) -> tuple:
        return (*self.shape, "copy_spread")

    @property
    def copies(self) -> int:
        return self.slots // self.rows

    @property
    def cut(self) -> int:
        """Values in the last, cut copy."""
        return self.slots - self.copies * self.rows

    def masks(self, backend: SealBackend, parms_id) -> tuple:
        """The masks of copy 0 and of the cut copy's values (`None` when the copies fill the slots)."""
        key = tuple(parms_id)
        if key not in self._masks:
            position = np.arange(self.slots)
            whole = backend.encode_factor((position < self.rows).astype(np.float64), parms_id)
            cut = backend.encode_factor((position < self.cut).astype(np.float64), parms_id) if self.cut else None
            self._masks[key] = (whole, cut)
        return self._masks[key]


def _masked(backend: SealBackend, ct: sealapi.Ciphertext, mask: sealapi.Plaintext) -> sealapi.Ciphertext:
    """`ct ⊙ mask`, rescaled (one level)."""
    product = sealapi.Ciphertext()
    backend.evaluator.multiply_plain(ct, mask, product)
    return backend.rescaled(product)


def copy_mask(backend: SealBackend, ct: sealapi.Ciphertext, matrix: CopyMask) -> sealapi.Ciphertext:
    """`ct` with every slot outside copy `matrix.copy` zeroed: one level."""
    return _masked(backend, ct, matrix.mask(backend, ct.parms_id()))


def copy_spread(backend: SealBackend, ct: sealapi.Ciphertext, matrix: CopySpread) -> sealapi.Ciphertext:
    """Copy 0 of `ct` in every copy, and its first values in the cut copy: one level,
    `window_sum_rotations(copies)` rotations (+1 for the cut copy)."""
    whole, cut = matrix.masks(backend, ct.parms_id())
    spread = _window_sum(backend, _masked(backend, ct, whole), matrix.copies, -matrix.rows)
    if cut is not None:
        # its own mask: rotating all of copy 0 there would wrap its other values onto copy 0
        tail = backend.rotate(_masked(backend, ct, cut), -matrix.copies * matrix.rows)
        backend.evaluator.add_inplace(spread, tail)
    return spread


def matrix_for_cost_key(key: tuple, slots: int, rng: np.random.Generator) -> PlaintextMatrix:
    """A matrix whose product costs what `key` (a `cost_key`) prices: random weights of that shape,
    or the block sum, copy mask, copy spread or RoPE of that width (`costs.measure_op_costs`)."""
    rows, cols = key[:2]
    if len(key) == 2:
        return PlaintextMatrix(rng.uniform(-1, 1, (rows, cols)))
    kind = key[2]
    if kind == "rotary":
        head_dim = key[3]
        angles = rng.uniform(0, 2 * np.pi, head_dim)
        return RotaryMatrix(np.cos(angles), np.sin(angles), rows // head_dim)
    if kind == "copy_mask":
        return CopyMask(rows, slots, 0)
    if kind == "copy_spread":
        return CopySpread(rows, slots)
    return BlockSumMatrix(rows, kind)


def periodic(rows: int, slots: int) -> bool:
    """Whether a `rows`-value vector fills the slots with whole copies (`rows` divides the slot
    count): its products are then right in every slot, whatever their width."""
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
    return backend.rescaled(total)


def matmul(backend: SealBackend, ct: sealapi.Ciphertext, matrix: PlaintextMatrix,
           budget: EncodingBudget | None = None) -> sealapi.Ciphertext:
    """`ct @ matrix` by BSGS; one level, like TenSEAL's `matmul`, and the same slots."""
    return bsgs(backend, ct, matrix.plaintexts(backend, ct.parms_id(), budget), matrix.rows)
