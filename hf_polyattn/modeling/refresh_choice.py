"""Each site's approximation chosen for the ring it runs on: the fewest refreshes, not the least depth.

On an interactive CKKS ring a refresh is paid by every ciphertext that runs out of levels, not
once per level of the critical path. With 2 levels between refreshes (the default ring, N=8192),
a norm's degree-31 minimax guess (depth 5, 19 ct×ct) refreshes ~17 of its intermediate
ciphertexts where a degree-7 guess and two Newton steps (depth 7, 11 ct×ct) refresh ~7: the
shallowest circuit is not the cheapest one. So, per decoder block, every combination of its
"auto" sites' candidates (each initial-guess degree with the fewest iterations meeting the
tolerance) is run through the circuit (`circuit.DecoderCircuit` on symbolic
ciphertexts, the code the server runs, in the whole model: a block's output depth sets where the
next one's refreshes fall), and the one with the fewest refreshes is kept, within
`max_block_depth` when one is given. What a ring adds to the circuit (slots, normaliser
resolution, value limit) moves levels too, so the CKKS side runs this with its own plan options
(`hf_polyattn.ckks.ring_choice.fit_to_ring`); `to_polynomial` itself keeps the shallowest circuits.
"""

import dataclasses
import itertools

from transformers.utils.logging import tqdm

from .circuit import CircuitPlan, circuit_depths, symbolic_run
from .polynomial import AUTO_INIT_DEGREES, SWEEP_POINTS, Approximation, build_approximation
from .polynomial_form import approximated_ops, polynomial_enabled
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
                         plan_options: dict | None = None, progress: bool = False) -> dict[str, dict]:
    """Install, on `model` (in polynomial form, domains set), the reciprocal and inverse-square-root
    approximations of its "auto" sites that make the fewest refreshes on a ring with
    `levels_per_refresh` levels between refreshes, and return their specs.

    Block by block, first to last (a block's output depth sets where the next one's refreshes
    fall), then the final norm: every combination of the block's candidates (`site_candidates`,
    and the installed one) is run through the whole model's circuit for two tokens
    (`circuit.symbolic_run` on `CircuitPlan.from_model(model, **plan_options)`: give it the
    options the server builds its plan with, e.g. its slots and normaliser resolution, since
    they move levels), and the fewest refreshes win; ties keep the installed one, so the count
    never grows. `max_block_depth`: a block's depth (from a fresh input) stays within it where
    some combination allows it, else the least excess.
    """
    if isinstance(levels_per_refresh, bool) or not isinstance(levels_per_refresh, int) or levels_per_refresh < 1:
        raise ValueError(f"levels_per_refresh must be an integer >= 1, got {levels_per_refresh!r}")
    if max_block_depth is not None and (isinstance(max_block_depth, bool) or not isinstance(max_block_depth, int)
                                        or max_block_depth < 1):
        raise ValueError(f"max_block_depth must be None or an integer >= 1, got {max_block_depth!r}")
    ops = approximated_ops(getattr(model, "base_model", model))
    if not polynomial_enabled(model.config) or any(op.approximation is None for op in ops.values()):
        raise ValueError("the model is not in polynomial form; call to_polynomial() first")
    spec = model.config.polynomial
    options, tolerance = spec["options"], spec["tolerance"]
    groups: dict[int | None, dict[str, list[Approximation]]] = {}
    for name, op in ops.items():
        site = spec["sites"][name]
        if op.kind in ITERATIVE_KINDS and options[op.kind].get("init_degree") == "auto":
            domain_only = {k: v for k, v in site.items() if k not in ("init_degree", "iterations")}
            candidates = [c for c in site_candidates(domain_only, tolerance, levels_per_refresh)
                          if c.spec() != op.approximation.spec()]
            if candidates:  # the installed one first: ties keep it
                groups.setdefault(_block_of(name), {})[name] = [op.approximation, *candidates]
    order = sorted(groups, key=lambda block: (block is None, block or 0))  # blocks in order, the head last
    chosen = {}
    for block in tqdm(order, desc="choosing approximations", disable=not progress, unit="block"):
        sites = groups[block]
        best = None
        for combination in itertools.product(*sites.values()):
            for name, approximation in zip(sites, combination):
                ops[name].install(approximation, name, ops[name].check_domain)
            refreshes, depth = _cost(model, block, levels_per_refresh, plan_options or {})
            excess = 0 if max_block_depth is None or block is None else max(depth - max_block_depth, 0)
            key = (excess, refreshes)
            if best is None or key < best[0]:
                best = (key, combination)
        for name, approximation in zip(sites, best[1]):
            ops[name].install(approximation, name, ops[name].check_domain)
            chosen[name] = approximation.spec()
    return chosen


def _cost(model, block: int | None, levels_per_refresh: int, plan_options: dict) -> tuple[int, int]:
    """The whole model's refreshes over `TOKENS` steps, and the depth of `block` (`None`: the head's)."""
    plan = CircuitPlan.from_model(model, **plan_options)
    refreshes = symbolic_run(plan, TOKENS, top_level=levels_per_refresh).refreshes
    blocks = () if block is None else (dataclasses.replace(plan.blocks[block], index=0),)
    depths = circuit_depths(dataclasses.replace(plan, blocks=blocks))
    return refreshes, depths["head_depth"] if block is None else depths["blocks"][0]["depth"]


__all__ = ["choose_for_refreshes", "site_candidates"]
