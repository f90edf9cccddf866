"""Level planning: walk the server's circuit before any ciphertext exists.

`PlannedCipher` stands in for a `Cipher` with the same rules (a multiplication or matmul takes
one level; an operand with no level left is refreshed first), so running the server's own step
code on it predicts the levels consumed and the refreshes a sequence needs.
"""

import copy
from collections import Counter
from numbers import Real

from .matmul import PlaintextMatrix
from .profiler import LatencyProfiler


class PlanningEngine:
    def __init__(self, top_level: int, refresh_allowed: bool = True):
        self.top_level = top_level
        self.refresh_allowed = refresh_allowed
        self.levels_consumed = 0
        self.refreshes = 0
        self.profiler = LatencyProfiler()
        self.ops: Counter = Counter()  # "ct×ct", "ct×pt", "add" (what a cost model prices)
        self.matmuls: Counter = Counter()  # (rows, cols) of every plaintext-matrix product

    def fresh(self, size: int) -> "PlannedCipher":
        return PlannedCipher(size, self.top_level, self)


class PlannedCipher:
    __slots__ = ("size", "level", "engine")

    def __init__(self, size: int, level: int, engine: PlanningEngine):
        self.size, self.level, self.engine = size, level, engine

    def _fresh_enough(self) -> "PlannedCipher":
        if self.level > 0:
            return self
        if not self.engine.refresh_allowed:
            raise ValueError("the circuit needs a refresh and refreshing is disabled")
        self.engine.refreshes += 1
        return PlannedCipher(self.size, self.engine.top_level, self.engine)

    def _multiply(self, other) -> "PlannedCipher":
        a = self._fresh_enough()
        level = a.level
        if isinstance(other, PlannedCipher):
            level = min(level, other._fresh_enough().level)
            self.engine.ops["ct×ct"] += 1
        elif isinstance(other, Real):
            self.engine.ops["ct×pt"] += 1
        else:
            raise TypeError(f"PlannedCipher combines with PlannedCiphers or numbers, not {type(other).__name__}")
        self.engine.levels_consumed += 1
        return PlannedCipher(self.size, level - 1, self.engine)

    def _add(self, other) -> "PlannedCipher":
        self.engine.ops["add"] += 1
        level = min(self.level, other.level) if isinstance(other, PlannedCipher) else self.level
        return PlannedCipher(self.size, level, self.engine)

    __mul__ = __rmul__ = _multiply
    __add__ = __radd__ = __sub__ = __rsub__ = _add

    def __neg__(self):
        return self

    def matmul(self, matrix: PlaintextMatrix) -> "PlannedCipher":
        a = self._fresh_enough()
        self.engine.levels_consumed += 1
        self.engine.matmuls[matrix.shape] += 1
        return PlannedCipher(matrix.cols, a.level - 1, self.engine)

    def serialize(self) -> None:
        return None


def plan(server, num_tokens: int, top_level: int | None = None) -> dict:
    """Levels consumed, refreshes and operation counts of `num_tokens` incremental steps of
    `server`'s model, on its ring or on one with `top_level` levels between refreshes."""
    planner = copy.copy(server)
    levels = server.engine.top_level if top_level is None else top_level
    planner.engine = PlanningEngine(levels, server.engine.refresher is not None)
    planner.reset()
    for _ in range(num_tokens):
        planner._forward(planner.engine.fresh(server.config.hidden_size))
    engine = planner.engine
    return {
        "levels_consumed": engine.levels_consumed,
        "refreshes": engine.refreshes,
        "ops": dict(engine.ops),
        "matmuls": dict(engine.matmuls),
    }


def circuit_depth(server) -> int:
    """Levels one token's step consumes along its critical path, with no refresh (the depth)."""
    planner = copy.copy(server)
    unlimited = 10**6
    planner.engine = PlanningEngine(unlimited, refresh_allowed=False)
    planner.reset()
    return unlimited - planner._forward(planner.engine.fresh(server.config.hidden_size)).level
