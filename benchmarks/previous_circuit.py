"""The circuit as it was before the depth work (commit f0b0fe1), kept to state "before" numbers.

Approximations: Chebyshev series by the full product tree after a ct×pt map to [-1, 1] (depth
⌈log2 d⌉ + 2), Goldschmidt from a constant guess (1 + k), Newton inverse sqrt from a constant
guess (3 levels a step). Block: norm = x² (1) + mean matmul (1) + inverse sqrt + broadcast matmul
(1) + x·s (1); attention = projection (1) + q⊙k (1) + head sums (1) + power + [1/L] + reciprocal +
[1/L] + weights (1) + head expansion (1) + ⊙v (1) + o_proj (1); MLP = projection (1) +
activation + ×up (1) + down (1).
"""

import math

from hf_polyattn.modeling.symbolic import measure_circuit


def _old_chebyshev(t, degree: int):
    basis = {1: t}
    for k in range(2, degree + 1):
        high = 1 << (k.bit_length() - 1)
        if high == k:
            half = basis[k // 2] * basis[k // 2]
            basis[k] = half + half - 1.0
        else:
            product = basis[high] * basis[k - high]
            basis[k] = product + product - basis[high - (k - high)]
    total = None
    for k in range(1, degree + 1):
        term = 0.5 * basis[k]
        total = term if total is None else total + term
    return total


def _old_goldschmidt(x, iterations: int):
    y, error = 0.5, None
    for _ in range(iterations):
        error = 1.0 - x * 0.5 if error is None else error * error
        y = y * (1.0 + error)
    return y


def _old_newton_inv_sqrt(x, iterations: int):
    y, half_x = 0.5, 0.5 * x
    for _ in range(iterations):
        y = y * (1.5 - half_x * (y * y))
    return y


def previous_site_cost(spec: dict) -> dict[str, int]:
    """Depth, ct×ct and ct×pt of a site under the previous circuits, from its spec (constant
    initial guesses and least-squares activations, the previous defaults)."""
    kind = spec["kind"]
    if kind == "activation":
        degree = spec["degree"]
        return measure_circuit(lambda x: _old_chebyshev(x * 0.25 + 0.1, degree))
    if spec.get("init_degree", 0) != 0:
        raise ValueError("the previous defaults used constant initial guesses only")
    if kind == "reciprocal":
        if spec["method"] != "goldschmidt":
            raise ValueError("the previous defaults used Goldschmidt")
        return measure_circuit(lambda x: _old_goldschmidt(x, spec["iterations"]))
    return measure_circuit(lambda x: _old_newton_inv_sqrt(x, spec["iterations"]))


def previous_block_depths(sites: dict[str, dict], config) -> list[int]:
    """Per block, the depth the previous circuit had with these site specs (Llama layout)."""
    power_depth = math.ceil(math.log2(config.attn_power))
    mean_extra = 2 if config.attn_form == "mean" else 0
    depth = {name: previous_site_cost(spec)["depth"] for name, spec in sites.items() if "kind" in spec}
    blocks = []
    for index in range(config.num_hidden_layers):
        prefix = f"layers.{index}."
        attention = depth[prefix + "input_layernorm.inv_sqrt"] + 4 + 3 + power_depth + mean_extra + depth[prefix + "self_attn.reciprocal"] + 4
        mlp = depth[prefix + "post_attention_layernorm.inv_sqrt"] + 4 + 1 + depth[prefix + "mlp.act_fn"] + 2
        blocks.append(attention + mlp)
    return blocks
