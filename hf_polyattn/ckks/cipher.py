"""`Cipher`: an encrypted vector with +, -, ×, matmul, refreshed when its levels run out.

The polynomial circuits of `hf_polyattn.modeling.polynomial` are written with +, - and ×
alone, so they run on `Cipher`s unchanged: the server evaluates exactly the plaintext circuit.
"""

from numbers import Real

import tenseal as ts
import tenseal.sealapi as sealapi

from ..modeling.symbolic import drops_a_level_first
from . import matmul
from .client import key_id, load_vector
from .matmul import (
    BlockSumMatrix,
    CopyMask,
    CopySpread,
    EncodingBudget,
    PlaintextMatrix,
    RotaryMatrix,
    require_supported_product,
)
from .profiler import LatencyProfiler
from .refresh import Refresher
from .seal_backend import SealBackend


class DepthExceededError(RuntimeError):
    """A multiplication needs a level that is not there and refreshing is not allowed."""


class CipherEngine:
    """What every `Cipher` of one server shares: the public context, the refresh strategy, the
    profiler, the level accounting, and how many encoded diagonals its products may keep."""

    def __init__(
        self,
        public_context: bytes,
        refresher: Refresher | None,
        profiler: LatencyProfiler | None = None,
        encoding_budget: EncodingBudget | None = None,
    ):
        context = ts.context_from(public_context)
        if context.is_private():
            raise ValueError("the server's context holds a secret key: give it CKKSClient.public_context() only")
        self.context = context
        self.key_id = key_id(public_context)
        self.refresher = refresher
        self.profiler = profiler or LatencyProfiler()
        self.top_level = context.seal_context().data.first_context_data().chain_index()
        self.levels_consumed = 0  # every level any ciphertext used up (what the planner predicts)
        self.seal = SealBackend(context)
        self.encoding_budget = encoding_budget or EncodingBudget()

    def load(self, ciphertext: bytes) -> "Cipher":
        with self.profiler.op("serialization"):
            vector = load_vector(self.context, ciphertext, self.key_id)
        return Cipher(vector.ciphertext()[0], vector.size(), self)

    def refresh(self, cipher: "Cipher") -> "Cipher":
        if self.refresher is None:
            raise DepthExceededError(
                "a multiplication needs one more level than the ciphertext has and refreshing is disabled: "
                "use a larger ring (more levels) or enable refreshes"
            )
        fresh = self.refresher(self.seal, cipher.ct, cipher.size, self.profiler, all_slots=cipher.packed)
        return Cipher(fresh, cipher.size, self, cipher.packed)


class Cipher:
    """An encrypted vector of `size` values in TenSEAL's layout (repeated over the slots), held as
    a SEAL ciphertext. Operands: other `Cipher`s of the same size, or Python numbers.

    Plain lists and arrays are refused: TenSEAL zero-pads them across the slots (issue #462)
    and a later matmul is silently wrong; fold them into a matmul or encrypt them.

    `packed`: its slots hold different values (the packed KV cache: a position per copy), not
    `size` values repeated; a refresh then carries every slot, where it otherwise re-encrypts
    the first `size` values repeated (which also drops what the other slots held).

    A `Cipher` never changes: every operation makes a new ciphertext.
    """

    __slots__ = ("ct", "size", "engine", "packed", "_refreshed")

    def __init__(self, ct: sealapi.Ciphertext, size: int, engine: CipherEngine, packed: bool = False):
        self.ct = ct
        self.size = size
        self.engine = engine
        self.packed = packed
        self._refreshed: Cipher | None = None

    @property
    def level(self) -> int:
        return self.engine.seal.level(self.ct)

    @property
    def vector(self) -> ts.CKKSVector:
        """A TenSEAL vector of the same values (a copy, through TenSEAL's serialized form)."""
        return self.engine.seal.to_vector(self.ct, self.size)

    def _fresh_enough(self) -> "Cipher":
        """Itself while it has a level left; else its refreshed copy, made once and reused (a value
        used by many products, a cached key, a query, is refreshed once, not once per product)."""
        if self.level > 0:
            return self
        if self._refreshed is None:
            self._refreshed = self.engine.refresh(self)
        return self._refreshed

    def _check(self, other) -> None:
        if isinstance(other, Cipher):
            if other.engine is not self.engine:
                raise ValueError("ciphertexts of different contexts cannot be combined")
            if other.size != self.size:
                raise ValueError(f"size mismatch: {self.size} vs {other.size} (use matmul to reduce or broadcast)")
        elif not isinstance(other, Real):
            raise TypeError(
                f"Cipher combines with Ciphers or numbers, not {type(other).__name__} "
                "(TenSEAL zero-pads plain vectors, issue #462)"
            )

    def _multiply(self, other) -> "Cipher":
        self._check(other)
        a = self._fresh_enough()
        seal, profiler = self.engine.seal, self.engine.profiler
        if isinstance(other, Cipher):
            b = other._fresh_enough()
            with profiler.op("ct×ct mult"):
                ct = seal.multiply(a.ct, b.ct)
            return self._made(ct, other.packed)
        if abs(other) * self.engine.context.global_scale < 1:
            raise ValueError(f"the constant {other!r} encodes to zero at this scale; drop the term")
        with profiler.op("ct×pt mult"):
            ct = seal.multiply_scalar(a.ct, float(other))
        return self._made(ct)

    def _made(self, ct: sealapi.Ciphertext, other_packed: bool = False, level: bool = True) -> "Cipher":
        """The result of a product (a level) or an addition (`level=False`): packed if an operand is."""
        if level:
            self.engine.levels_consumed += 1
        return Cipher(ct, self.size, self.engine, self.packed or other_packed)

    def _add(self, other, sign: float = 1.0) -> "Cipher":
        self._check(other)
        seal = self.engine.seal
        with self.engine.profiler.op("add"):
            if isinstance(other, Cipher):
                return self._made(seal.add(self.ct, other.ct, subtract=sign < 0), other.packed, level=False)
            return self._made(seal.add_scalar(self.ct, float(sign * other)), level=False)

    def __mul__(self, other):
        return self._multiply(other)

    __rmul__ = __mul__

    def __add__(self, other):
        return self._add(other)

    __radd__ = __add__

    def __sub__(self, other):
        return self._add(other, -1.0)

    def __rsub__(self, other):
        return (-self)._add(other)

    def __neg__(self):
        with self.engine.profiler.op("add"):
            return self._made(self.engine.seal.negate(self.ct), level=False)

    def matmul(self, matrix: "PlaintextMatrix | list[list[float]]") -> "Cipher":
        """`self @ matrix` for a plaintext `(size × n)` matrix: baby-step giant-step on raw SEAL (see
        `matmul.py`), refused where the replicated layout is wrong (rows + cols > slots + 1 when
        the rows do not divide the slots)."""
        if not isinstance(matrix, PlaintextMatrix):
            matrix = PlaintextMatrix(matrix)
        if matrix.rows != self.size:
            raise ValueError(f"matmul of a size-{self.size} vector with a {matrix.rows}-row matrix")
        seal = self.engine.seal
        require_supported_product(matrix.rows, matrix.cols, seal.slots)
        a = self._fresh_enough()
        if drops_a_level_first(matrix.cost_key, a.level, self.engine.top_level):
            a = Cipher(seal.lowered(a.ct), a.size, self.engine, a.packed)
            self.engine.levels_consumed += 1
        # packed out: a copy mask, a product (or RoPE) writing some slots only or products taking turns
        # copy by copy, a block sum of packed values
        packed = matrix.packs
        with self.engine.profiler.op("pt×ct matmul"):
            if isinstance(matrix, BlockSumMatrix):
                ct, packed = matmul.block_sum(seal, a.ct, matrix), self.packed
            elif isinstance(matrix, CopyMask):
                ct, packed = matmul.copy_mask(seal, a.ct, matrix), True
            elif isinstance(matrix, CopySpread):
                ct = matmul.copy_spread(seal, a.ct, matrix)
            elif isinstance(matrix, RotaryMatrix):
                ct = matmul.rotary(seal, a.ct, matrix)
            else:
                ct = matmul.matmul(seal, a.ct, matrix, self.engine.encoding_budget)
        self.engine.levels_consumed += 1
        return Cipher(ct, matrix.cols, self.engine, packed)

    def rotate(self, step: int) -> "Cipher":
        """Rotated by `step` slots (slot `j` takes slot `j + step`): no level, the same size and packing."""
        with self.engine.profiler.op("rotation"):
            return Cipher(self.engine.seal.rotate(self.ct, step), self.size, self.engine, self.packed)

    def rotate_sum(self, stride: int, count: int) -> "Cipher":
        """`Σ_{i<count} rot(self, i·stride)` over the slots: no level (the packed KV cache's sum of
        copies). The result is read from its first `size` slots (copy 0 holds the whole sum), so
        it is not packed: a refresh repeats those, and drops what wrapped into the other copies
        (partial sums that could pass the refresh's bound)."""
        with self.engine.profiler.op("rotation"):
            return Cipher(matmul.rotate_sum(self.engine.seal, self.ct, stride, count), self.size, self.engine)

    def replicated(self) -> "Cipher":
        """Refreshed now, whatever its level (taken to the last level first, as a refresh is): the
        client re-encrypts its first `size` values repeated over every slot, so every slot is right
        again. Where a product's rows do not divide the slots, its last outputs read past the cut
        copy of its input; the packed KV cache's projections need every copy right."""
        if self.packed:
            raise ValueError("a packed ciphertext holds a value per copy: it is refreshed over all slots, not replicated")
        lowest = Cipher(self.engine.seal.at_last_level(self.ct), self.size, self.engine)
        return self.engine.refresh(lowest)

    def serialize(self) -> bytes:
        with self.engine.profiler.op("serialization"):
            return self.engine.key_id + self.engine.seal.serialize(self.ct, self.size)
