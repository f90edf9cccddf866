"""Latency profiler: every encrypted operation timed and counted by kind."""

import time
from collections import defaultdict
from contextlib import contextmanager

# Kinds that keep their own name inside a step (a refresh inside the reciprocal is a refresh).
OWN_KINDS = ("refresh", "encrypt", "decrypt", "serialization")


class LatencyProfiler:
    """Seconds and counts per operation kind, and seconds per scope (e.g. `layer 0`).

    Basic operations ("pt×ct matmul", "ct×ct mult", "ct×pt mult", "add") are booked under the
    step they belong to when one is open (`with profiler.step("reciprocal")`: the paper's
    breakdown), refreshes and (de)serialisation always under their own name.
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.op_counts: dict[str, int] = defaultdict(int)  # every basic op by its own kind
        self.scope_seconds: dict[str, float] = defaultdict(float)
        self.bytes = {"to_client": 0, "to_server": 0}
        self.refreshes = 0
        self._step: str | None = None
        self._scope = "model"
        self._depth = 0

    @contextmanager
    def op(self, kind: str):
        booked = kind if kind in OWN_KINDS or self._step is None else self._step
        self.op_counts[kind] += 1
        start = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:  # a refresh runs ops of its own: count the outermost only
                elapsed = time.perf_counter() - start
                self.seconds[booked] += elapsed
                self.scope_seconds[self._scope] += elapsed
                self.counts[booked] += 1

    @property
    def site(self) -> str:
        """Where in the circuit an operation runs now: `"layer 0 / norm"` (scope / step)."""
        return f"{self._scope} / {self._step or 'other'}"

    def step(self, name: str):
        """Book the basic operations inside under `name` (e.g. "reciprocal")."""
        return self._within("_step", name)

    def scope(self, name: str):
        """Add the time of the operations inside to `scope_seconds[name]` (e.g. "layer 0")."""
        return self._within("_scope", name)

    @contextmanager
    def _within(self, attribute: str, name: str):
        previous = getattr(self, attribute)
        setattr(self, attribute, name)
        try:
            yield
        finally:
            setattr(self, attribute, previous)

    def merge(self, other: "LatencyProfiler") -> "LatencyProfiler":
        """Add `other`'s times, counts, bytes and refreshes (e.g. a server process's) to this one."""
        for mine, theirs in (
            (self.seconds, other.seconds),
            (self.counts, other.counts),
            (self.op_counts, other.op_counts),
            (self.scope_seconds, other.scope_seconds),
            (self.bytes, other.bytes),
        ):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        self.refreshes += other.refreshes
        return self

    _TABLES = ("seconds", "counts", "op_counts", "scope_seconds", "bytes")

    def to_dict(self) -> dict:
        """Plain JSON-able numbers (what a server sends back over the network: never pickled)."""
        return {**{name: dict(getattr(self, name)) for name in self._TABLES}, "refreshes": self.refreshes}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyProfiler":
        """The profiler `to_dict` described; anything but names mapped to numbers is refused."""
        profiler = cls()
        try:
            for name in cls._TABLES:
                table = data.get(name, {})
                if not isinstance(table, dict) or not all(
                    isinstance(key, str) and isinstance(value, (int, float)) and not isinstance(value, bool)
                    for key, value in table.items()
                ):
                    raise TypeError(name)
                getattr(profiler, name).update(table)
            refreshes = data.get("refreshes", 0)
            if not isinstance(refreshes, int) or isinstance(refreshes, bool):
                raise TypeError("refreshes")
        except (AttributeError, TypeError) as error:
            raise ValueError(f"not a latency profile (field {error})") from None
        profiler.refreshes = refreshes
        return profiler

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self) -> str:
        """The breakdown as a Markdown table, largest first."""
        total = self.total or 1.0
        lines = ["| operation | count | seconds | share |", "|---|---|---|---|"]
        for kind, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {kind} | {self.counts[kind]} | {seconds:.3f} | {100 * seconds / total:.1f} % |")
        lines.append(f"| **total** | | {self.total:.3f} | 100 % |")
        lines.append("")
        lines.append(
            f"refreshes {self.refreshes}; bytes to the client {self.bytes['to_client']:,}, "
            f"to the server {self.bytes['to_server']:,}"
        )
        return "\n".join(lines)
