"""Each site's approximation chosen for the ring it runs on: the fewest refreshes, not the least depth.

On an interactive CKKS ring a refresh is paid by every ciphertext that runs out of levels, not
once per level of the critical path. With 2 levels between refreshes (the default ring, N=8192),
a norm's degree-31 minimax guess (depth 5, 19 ct×ct) refreshes ~17 of its intermediate
ciphertexts where a degree-7 guess and two Newton steps (depth 7, 11 ct×ct) refresh ~7: the
shallowest circuit is not the cheapest one. So, per decoder block, every combination of its
"auto" sites' candidates (each initial-guess degree with the fewest iterations meeting the
tolerance) is run through the block's own circuit (`circuit.DecoderCircuit` on symbolic
ciphertexts, the code the server runs), and the one with the fewest refreshes is kept, within
`max_block_depth` when one is given (a bootstrapped ring pays for depth instead; pass
`levels_per_refresh` = its levels).
"""

import dataclasses
import itertools

from transformers.utils.logging import tqdm

from .circuit import CircuitPlan, circuit_depths, symbolic_run
from .polynomial import AUTO_INIT_DEGREES, SWEEP_POINTS, Approximation, build_approximation
from .polynomial_form import approximated_ops
from .symbolic import CircuitTally

ITERATIVE_KINDS = ("reciprocal", "inv_sqrt")
TOKENS = 2  # a block's refreshes over two steps: its attention reads a cached key at the second


def _isolated_refreshes(approximation: Approximation, levels_per_refresh: int) -> int:
    """Refreshes of the approximation alone, summed over the levels its input may arrive with."""
    total = 0
    for used in range(levels_per_refresh):
        tally = CircuitTally(top_level=levels_per_refresh)
        x = tally.fresh()
        for _ in range(used):
            x = x * 1.0
        tally.refreshes = 0
        approximation.circuit_mapped(x)
        total += tally.refreshes
    return total


def site_candidates(spec: dict, tolerance: float, levels_per_refresh: int) -> list[Approximation]:
    """The approximations of one iterative site worth trying: each initial-guess degree with the
    fewest iterations meeting `tolerance`, less those another candidate beats on both depth and
    refreshes (the site's circuit alone). Empty when none meets the tolerance."""
    found = []
    for degree in AUTO_INIT_DEGREES:
        try:
            approximation = build_approximation(
                {**spec, "init_degree": degree, "iterations": None, "tolerance": tolerance}
            )
        except ValueError:  # the iteration does not converge from this guess
            continue
        if approximation.sweep_error(SWEEP_POINTS) <= tolerance:
            found.append((approximation.depth, _isolated_refreshes(approximation, levels_per_refresh), approximation))
    return [a for depth, refreshes, a in found
            if not any(d <= depth and r <= refreshes and (d, r) != (depth, refreshes) for d, r, _ in found)]


def _block_of(site: str) -> int | None:
    parts = site.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def choose_for_refreshes(model, levels_per_refresh: int, max_block_depth: int | None = None,
                         progress: bool = False) -> dict[str, dict]:
    """The specs of the "auto" reciprocal and inverse-square-root sites of `model` (in polynomial
    form, domains set) that make the fewest refreshes on a ring with `levels_per_refresh` levels
    between refreshes, block by block; a block's depth stays within `max_block_depth` where some
    combination allows it (else the shallowest excess). The chosen approximations are installed.
    """
    spec = model.config.polynomial
    options, tolerance = spec["options"], spec["tolerance"]
    ops = approximated_ops(getattr(model, "base_model", model))
    groups: dict[int | None, dict[str, list[Approximation]]] = {}
    for name, op in ops.items():
        site = spec["sites"][name]
        if op.kind in ITERATIVE_KINDS and options[op.kind].get("init_degree") == "auto":
            candidates = site_candidates({k: v for k, v in site.items() if k not in ("init_degree", "iterations")},
                                         tolerance, levels_per_refresh)
            if len(candidates) > 1:  # else the installed (shallowest) one stays
                groups.setdefault(_block_of(name), {})[name] = candidates
    chosen = {}
    for block, sites in tqdm(groups.items(), desc="choosing approximations", disable=not progress, unit="block"):
        best = None
        for combination in itertools.product(*sites.values()):
            for name, approximation in zip(sites, combination):
                ops[name].install(approximation, name, ops[name].check_domain)
            refreshes, depth = _block_cost(model, block, levels_per_refresh)
            excess = 0 if max_block_depth is None or block is None else max(depth - max_block_depth, 0)
            key = (excess, refreshes, depth)
            if best is None or key < best[0]:
                best = (key, combination)
        for name, approximation in zip(sites, best[1]):
            ops[name].install(approximation, name, ops[name].check_domain)
            chosen[name] = approximation.spec()
    return chosen


def _block_cost(model, block: int | None, levels_per_refresh: int) -> tuple[int, int]:
    """Refreshes and depth of one block's circuit alone (`None`: the final norm and head)."""
    plan = CircuitPlan.from_model(model)
    blocks = () if block is None else (dataclasses.replace(plan.blocks[block], index=0),)
    alone = dataclasses.replace(plan, blocks=blocks)
    refreshes = symbolic_run(alone, TOKENS, top_level=levels_per_refresh, lm_head=False).refreshes
    depths = circuit_depths(alone, lm_head=False)
    return refreshes, depths["head_depth"] if block is None else depths["blocks"][0]["depth"]


__all__ = ["choose_for_refreshes", "site_candidates"]
