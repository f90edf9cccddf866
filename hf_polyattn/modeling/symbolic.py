"""A symbolic ciphertext: what a CKKS ciphertext would go through, without any encryption.

`SymbolicCipher` has the operators of the server's `Cipher` (`+`, `-`, `*` with numbers or
another one, `matmul` with anything that has a `shape`), so the circuits written once in
`polynomial.py` and `circuit.py` run on it unchanged. Each run shares one `CircuitTally` that
counts what a CKKS backend would do: ct×ct and ct×pt products, additions, plaintext-matrix
products by shape, levels consumed and, on a ring with `top_level` levels, the refreshes.

Depth convention (the server's): a product of two ciphertexts, of a ciphertext by a number and a
plaintext-matrix product each consume one level; additions, adding numbers and rotations are free.
"""

from collections import Counter
from numbers import Real
from typing import Any


def window_sum_rotations(count: int) -> int:
    """Rotations in `Σ_{i<count} rot(x, i·stride)` by doubling windows joined by the binary digits of
    `count` (what a CKKS backend's window sum does): `floor(log2 count) + popcount(count) - 1`."""
    if count < 1:
        raise ValueError(f"a window sum needs count >= 1, got {count}")
    return count.bit_length() - 1 + bin(count).count("1") - 1


def drops_a_level_first(cost_key: tuple, levels_left: int, top_level: int | None) -> bool:
    """Whether a plaintext-matrix product runs one level below its input's (the level dropped).

    On a ring of 2 levels between refreshes a fresh ciphertext holds three primes and one level
    lower two: a dense (baby-step giant-step) product's rotations and plaintext products cost
    about half there and its encoded diagonals two thirds of the memory, for at most one more
    refresh (a d=576 product saves ~90 ms; a refresh costs ~5 ms). So a dense product of a fresh
    input takes it down a level first. Rings with more levels keep them (a level is a larger share
    of what a refresh buys, and the product's share of primes changes less). The server's `Cipher`
    and this module's `SymbolicCipher` both follow this rule, so the plan stays exact.
    """
    return top_level == 2 and levels_left == 2 and len(cost_key) == 2


class CircuitTally:
    """Counts shared by every `SymbolicCipher` of one run.

    Args:
        top_level: levels a fresh ciphertext can take (`None`: unbounded, measure depth only).
        refresh_allowed: whether an exhausted operand is refreshed (else a `ValueError`).
    """

    def __init__(self, top_level: int | None = None, refresh_allowed: bool = True):
        if top_level is not None and top_level < 1:
            raise ValueError(f"top_level must be >= 1, got {top_level}")
        self.top_level = top_level
        self.refresh_allowed = refresh_allowed
        self.levels_consumed = 0
        self.refreshes = 0
        self.ops: Counter = Counter()  # "ct×ct", "ct×pt", "add", "rotation"
        self.matmuls: Counter = Counter()  # every plaintext-matrix product by what prices it: (rows, cols[, block])

    def fresh(self, size: int = 1) -> "SymbolicCipher":
        """A freshly encrypted input of `size` values."""
        return SymbolicCipher(size, 0, self)

    def summary(self) -> dict[str, Any]:
        return {
            "levels_consumed": self.levels_consumed,
            "refreshes": self.refreshes,
            "ops": dict(self.ops),
            "matmuls": dict(self.matmuls),
        }


class SymbolicCipher:
    """A stand-in for a ciphertext of `size` values that has used `depth` levels since it was
    encrypted or refreshed."""

    __slots__ = ("size", "depth", "tally", "_refreshed")

    def __init__(self, size: int = 1, depth: int = 0, tally: CircuitTally | None = None):
        self.size, self.depth = size, depth
        self.tally = tally if tally is not None else CircuitTally()
        self._refreshed: SymbolicCipher | None = None

    def _fresh_enough(self) -> "SymbolicCipher":
        """Itself while it has a level left; else its refreshed copy, made once and reused (as the
        server's `Cipher` does)."""
        top = self.tally.top_level
        if top is None or self.depth < top:
            return self
        if not self.tally.refresh_allowed:
            raise ValueError(f"the circuit needs more than {top} levels between refreshes and refreshing is disabled")
        if self._refreshed is None:
            self.tally.refreshes += 1
            self._refreshed = SymbolicCipher(self.size, 0, self.tally)
        return self._refreshed

    def _multiply(self, other) -> "SymbolicCipher":
        a = self._fresh_enough()
        depth = a.depth
        if isinstance(other, SymbolicCipher):
            depth = max(depth, other._fresh_enough().depth)
            self.tally.ops["ct×ct"] += 1
        elif isinstance(other, Real):
            self.tally.ops["ct×pt"] += 1
        else:
            raise TypeError(f"a SymbolicCipher combines with SymbolicCiphers or numbers, not {type(other).__name__}")
        self.tally.levels_consumed += 1
        return SymbolicCipher(max(self.size, getattr(other, "size", 0)), depth + 1, self.tally)

    def _add(self, other) -> "SymbolicCipher":
        if isinstance(other, SymbolicCipher):
            self.tally.ops["add"] += 1
            return SymbolicCipher(max(self.size, other.size), max(self.depth, other.depth), self.tally)
        if not isinstance(other, Real):
            raise TypeError(f"a SymbolicCipher combines with SymbolicCiphers or numbers, not {type(other).__name__}")
        self.tally.ops["add"] += 1
        return SymbolicCipher(self.size, self.depth, self.tally)

    __mul__ = __rmul__ = _multiply
    __add__ = __radd__ = __sub__ = __rsub__ = _add

    def __neg__(self) -> "SymbolicCipher":
        return self

    def matmul(self, matrix) -> "SymbolicCipher":
        """`self @ matrix` for a plaintext matrix (anything with `shape = (rows, cols)`; counted by
        its `cost_key` when it has one, e.g. a head sum computed by rotations)."""
        rows, cols = matrix.shape
        a = self._fresh_enough()
        key = getattr(matrix, "cost_key", (rows, cols))
        top = self.tally.top_level
        dropped = top is not None and drops_a_level_first(key, top - a.depth, top)
        self.tally.levels_consumed += 1 + dropped
        self.tally.matmuls[key] += 1
        return SymbolicCipher(cols, a.depth + 1 + dropped, self.tally)

    def rotate(self, step: int) -> "SymbolicCipher":
        """Rotated by `step` slots: no level, one rotation."""
        self.tally.ops["rotation"] += 1
        return SymbolicCipher(self.size, self.depth, self.tally)

    def rotate_sum(self, stride: int, count: int) -> "SymbolicCipher":
        """`Σ_{i<count} rot(self, i·stride)`: no level; counted as its rotations (each with the
        addition that follows it, which the measured cost of a rotation includes)."""
        self.tally.ops["rotation"] += window_sum_rotations(count)
        return SymbolicCipher(self.size, self.depth, self.tally)

    def replicated(self) -> "SymbolicCipher":
        """Refreshed now, whatever its depth (the server's `Cipher.replicated`): counted as a refresh
        on a ring; on no ring (a depth report) it changes nothing, since depth counts levels."""
        if self.tally.top_level is None:
            return self
        if not self.tally.refresh_allowed:
            raise ValueError("the circuit refreshes a value to replicate it and refreshing is disabled")
        self.tally.refreshes += 1
        return SymbolicCipher(self.size, 0, self.tally)

    def serialize(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"SymbolicCipher(size={self.size}, depth={self.depth})"


def measure_circuit(circuit, size: int = 1) -> dict[str, int]:
    """Depth and product counts of `circuit` (a function of one ciphertext) from a fresh input."""
    tally = CircuitTally()
    out = circuit(tally.fresh(size))
    depth = out.depth if isinstance(out, SymbolicCipher) else 0
    return {"depth": depth, "ct_ct": tally.ops["ct×ct"], "ct_pt": tally.ops["ct×pt"]}


__all__ = ["CircuitTally", "SymbolicCipher", "drops_a_level_first", "measure_circuit", "window_sum_rotations"]
