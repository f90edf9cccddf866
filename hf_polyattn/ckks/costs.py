"""Predicted encrypted time: the planner's operation counts priced by per-operation costs
measured on this machine, and the ring chosen by that prediction.

`measure_op_costs(params, shapes)` times each primitive on one ring (a ct×ct and ct×pt product
with rescale, an addition, a masked refresh round trip, and the plaintext-matrix products of the
given shapes, by the method the server uses for each). `predict_seconds(plan, costs)` prices a
plan; `choose_parameters(server, tokens, candidates)` plans the same model on each candidate
ring (no ciphertext needed: a plan only needs the number of levels) and returns the cheapest
among those whose precision the model's attention normaliser tolerates.
"""

import time
from dataclasses import dataclass

import numpy as np

from .cipher import CipherEngine
from .client import CKKSClient
from .matmul import matrix_for_cost_key
from .params import PRECISION_LIMIT, CKKSParameters
from .refresh import ClientRoundTrip

@dataclass(frozen=True)
class OpCosts:
    """Seconds per primitive on one ring; `matmul` per product measured, by its cost key
    (`(rows, cols)`, `(rows, cols, block)` for a block sum by rotations, `(rows, cols, kind)` for
    the packed KV cache's masks and spreads); `rotation`: one rotation and the addition after it
    (the sums over the packed cache's copies)."""

    params: CKKSParameters
    ct_ct: float
    ct_pt: float
    add: float
    refresh: float
    matmul: dict[tuple, float]
    rotation: float = 0.0

    def matmul_seconds(self, shape: tuple[int, ...]) -> float:
        if shape not in self.matmul:
            raise ValueError(f"no measured cost for a {shape[0]}×{shape[1]} product; measure it with shapes=[...]")
        return self.matmul[shape]


def best_of(repeats: int, function) -> tuple[float, object]:
    """The least wall-clock seconds of `repeats` calls, and the last call's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure_op_costs(params: CKKSParameters, shapes, repeats: int = 3, seed: int = 0) -> OpCosts:
    """Time each primitive on `params`' ring (new keys), and the plaintext-matrix products of
    `shapes` by the method `Cipher.matmul` uses for them (e.g. `server.plan(T)["matmuls"]`)."""
    rng = np.random.default_rng(seed)
    client = CKKSClient(params)
    engine = CipherEngine(client.public_context(), ClientRoundTrip(client, seed=seed))

    def fresh(size: int):
        return engine.load(client.encrypt(rng.uniform(-1, 1, size)))

    x, y = fresh(64), fresh(64)
    ct_ct = best_of(repeats, lambda: x * y)[0]
    ct_pt = best_of(repeats, lambda: x * 0.5)[0]
    add = best_of(repeats, lambda: x + y)[0]
    spent = x
    while spent.level > 0:  # a client refreshes only what is at its last level
        spent = spent * 1.0
    refresh = best_of(repeats, lambda: engine.refresh(spent))[0]
    matmul = {}
    for key in sorted(set(shapes), key=str):
        vector, matrix = fresh(key[0]), matrix_for_cost_key(key, params.slots, rng)
        vector.matmul(matrix)  # encodes the diagonals once, as a server does for its weights
        matmul[key] = best_of(repeats, lambda: vector.matmul(matrix))[0]
    # the copy sums rotate by multiples of the attention width (the packed products' rows); SEAL
    # composes a step from power-of-two keys, so the stride matters
    stride = max([key[0] for key in shapes if len(key) == 3 and isinstance(key[2], str)], default=1)
    rotation = best_of(repeats, lambda: x.rotate_sum(stride, 2))[0]
    return OpCosts(params, ct_ct, ct_pt, add, refresh, matmul, rotation)


def predict_seconds(plan: dict, costs: OpCosts) -> float:
    """Predicted seconds of a plan (`CKKSServer.plan`) on the ring `costs` were measured on."""
    ops = plan["ops"]
    seconds = ops.get("ct×ct", 0) * costs.ct_ct + ops.get("ct×pt", 0) * costs.ct_pt + ops.get("add", 0) * costs.add
    seconds += ops.get("rotation", 0) * costs.rotation
    seconds += plan["refreshes"] * costs.refresh
    seconds += sum(count * costs.matmul_seconds(shape) for shape, count in plan["matmuls"].items())
    return seconds


def precision_ratio(server, params: CKKSParameters) -> float:
    """`params.precision` over the smallest (balanced) normaliser of `server`'s model."""
    return params.precision / server.smallest_normaliser()


def choose_parameters(server, num_tokens: int, candidates: list[OpCosts]) -> tuple[OpCosts, list[dict]]:
    """The candidate ring with the least predicted time for `num_tokens` steps of `server`'s
    model among those precise enough for it (`PRECISION_LIMIT`), and every candidate's plan,
    prediction and precision ratio (each planned on its own number of levels)."""
    if not candidates:
        raise ValueError("no candidate rings to choose from")
    table = []
    for costs in candidates:
        plan = server.plan(num_tokens, top_level=costs.params.levels)
        ratio = precision_ratio(server, costs.params)
        table.append(
            {"params": costs.params, "plan": plan, "predicted_seconds": predict_seconds(plan, costs),
             "precision_ratio": ratio, "precise_enough": ratio <= PRECISION_LIMIT}
        )
    usable = [i for i, row in enumerate(table) if row["precise_enough"]]
    if not usable:
        raise ValueError(
            f"no candidate ring is precise enough for this model (precision / smallest normaliser > {PRECISION_LIMIT}); "
            "use a larger scale_bits or raise attn_eps"
        )
    best = min(usable, key=lambda i: table[i]["predicted_seconds"])
    return candidates[best], table
