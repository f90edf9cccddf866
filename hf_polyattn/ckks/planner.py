"""Level planning: the server's circuit run on symbolic ciphertexts before any ciphertext exists.

`hf_polyattn.modeling.circuit.symbolic_run` runs the very step code the server runs
(`DecoderCircuit`) on `SymbolicCipher`s that follow the server's rules (a product or matmul takes
one level; an operand with no level left is refreshed first), so it predicts the levels consumed,
the refreshes and the operations of a sequence. It reads the server's snapshot of the model
(`server.circuit_plan`) and never touches the server's own state.
"""

from ..modeling.circuit import circuit_depths, symbolic_run


def plan(server, num_tokens: int, top_level: int | None = None) -> dict:
    """Levels consumed, refreshes and operation counts of `num_tokens` incremental steps of
    `server`'s model, on its ring or on one with `top_level` levels between refreshes."""
    levels = server.engine.top_level if top_level is None else top_level
    tally = symbolic_run(server.circuit_plan, num_tokens, levels, server.engine.refresher is not None, lm_head=server.lm_head)
    return tally.summary()


def circuit_depth(server) -> int:
    """Levels one token's step consumes along its critical path, with no refresh (the depth)."""
    return circuit_depths(server.circuit_plan, lm_head=server.lm_head)["total_depth"]
