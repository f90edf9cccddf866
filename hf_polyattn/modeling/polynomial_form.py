"""The polynomial form of a PolyAttn model: which steps are approximated, on which domains.

Three kinds of step are not polynomial in the exact model: the norms' inverse square root, the
attention normaliser's reciprocal and the MLP activation. Each sits in an `ApproximatedOp`
module (exact by default), so they are found by name, calibrated with forward hooks, and switched
to their `Approximation` together. The attention scores are divided by a public per-layer
constant `score_scale` instead of their data-dependent max (not polynomial).

Everything is described by plain data in `config.polynomial`:

    {"enabled": True, "calibrated": False, "tolerance": 1e-3, "margin": 2.0,
     "options": {"reciprocal": {...}, "inv_sqrt": {...}, "activation": {...}},
     "sites": {"layers.0.input_layernorm.inv_sqrt": {"kind": "inv_sqrt", "domain": [a, b], ...},
               "layers.0.self_attn": {"score_scale": 12.5}, ...}}
"""

import warnings
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .polynomial import DEFAULT_TOLERANCE, Approximation, build_approximation

# "auto": the initial guess's degree (minimax, depth-efficient 2^m - 1) that, with the fewest
# iterations meeting the tolerance, makes the shallowest circuit on the calibrated domain.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "reciprocal": {"method": "goldschmidt", "init_degree": "auto"},
    "inv_sqrt": {"init_degree": "auto"},
    "activation": {"degree": "auto", "fit": "minimax"},  # the lowest 2^m - 1 meeting the tolerance (absolute)
}
DEFAULT_MARGIN = 2.0  # positive domains: [min / margin, max · margin]
ACTIVATION_MARGIN = 0.25  # activation domains grow by this fraction of their width on each side

# Domains of an uncalibrated model: it always runs, but only calibration makes it accurate.
DEFAULT_SCORE_SCALE = 8.0
DEFAULT_DOMAINS = {"inv_sqrt": (1e-2, 1e2), "activation": (-8.0, 8.0)}


class PolynomialDomainWarning(UserWarning):
    """Inputs of an approximated step fell outside the domain its approximation is valid on."""


class ApproximatedOp(nn.Module):
    """A non-polynomial step of kind `"reciprocal"`, `"inv_sqrt"` or `"activation"`.

    Exact until an `Approximation` is set; then, with `check_domain`, it counts the inputs outside
    the approximation's domain and warns once (a silent wrong answer is the failure mode of every
    polynomial approximation).
    """

    def __init__(self, kind: str, exact, harmless_at: float | None = None):
        super().__init__()
        self.kind = kind
        self.exact = exact
        # The lowest possible input, reached only when the result is multiplied by (nearly) zero
        # anyway: a norm's eps (an all-zero vector, e.g. a padding embedding), the attention
        # normaliser's floor (a fully masked row). Inputs there are neither calibrated on nor
        # warned about.
        self.harmless_at = harmless_at
        self.approximation: Approximation | None = None
        self.last_approximation: Approximation | None = None  # kept across to_exact() for reuse
        self.site_name = kind
        self.check_domain = True
        self.outside_count = 0
        self._warned = False

    def install(self, approximation: Approximation, name: str | None = None, check_domain: bool = True) -> None:
        """Run `approximation` from now on (and count inputs outside its domain when `check_domain`)."""
        self.approximation = approximation
        self.site_name = name or self.site_name
        self.check_domain = check_domain
        self.outside_count, self._warned = 0, False

    def remove(self) -> None:
        """Back to the exact step; the approximation is kept for a later `reusable()`."""
        self.last_approximation, self.approximation = self.approximation or self.last_approximation, None

    def reusable(self, spec: dict[str, Any]) -> Approximation | None:
        """The current or last approximation when it is the one `spec` describes (no refit)."""
        last = self.approximation or self.last_approximation
        return last if last is not None and last.spec() == spec else None

    @contextmanager
    def exact_for_now(self):
        """The exact step inside the block (calibration), the approximation back after it."""
        saved, self.approximation = self.approximation, None
        try:
            yield self
        finally:
            self.approximation = saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximation is None:
            return self.exact(x)
        if self.check_domain:
            self._count_outside(x)
        return self.approximation(x)

    @torch.no_grad()
    def _count_outside(self, x: torch.Tensor) -> None:
        low, high = self.approximation.domain
        x = self.relevant(x)
        outside = int(((x < low) | (x > high)).sum())
        if not outside:
            return
        self.outside_count += outside
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.site_name}: {outside} of {x.numel()} {self.kind} inputs fall outside the domain "
                f"[{low:.4g}, {high:.4g}] (observed [{float(x.min()):.4g}, {float(x.max()):.4g}]); the "
                "polynomial form is inaccurate there. Calibrate on representative data or widen the domain.",
                PolynomialDomainWarning,
                stacklevel=2,
            )

    def relevant(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs whose approximation matters (all but the `harmless_at` value)."""
        return x if self.harmless_at is None else x[x > self.harmless_at * (1 + 1e-5)]

    def extra_repr(self) -> str:
        return f"kind={self.kind}, approximation={self.approximation!r}"


def polynomial_enabled(config) -> bool:
    """Whether `config` describes a model running its polynomial form."""
    return bool(getattr(config, "polynomial", None) and config.polynomial.get("enabled"))


def normaliser_floor(config, score_scale: float) -> float:
    """The smallest attention normaliser: `eps` in units of scores divided by `score_scale`."""
    return config.attn_eps / score_scale**config.attn_power


def approximated_ops(base_model: nn.Module) -> dict[str, ApproximatedOp]:
    return {name: m for name, m in base_model.named_modules() if isinstance(m, ApproximatedOp)}


def score_scaled_attentions(base_model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in base_model.named_modules() if hasattr(m, "score_probe")}


def _positive_domain(low: float, high: float, margin: float, floor: float = 0.0) -> list[float]:
    # Nothing occurs below the floor (the normaliser's eps); inputs at the floor are harmless.
    low = max(low / margin, floor) if low > 0 else max(high * 1e-6, floor)
    return [low, max(high * margin, low * (1 + 1e-6))]


def _activation_domain(low: float, high: float) -> list[float]:
    pad = ACTIVATION_MARGIN * max(high - low, 1e-3)
    return [low - pad, high + pad]


def build_polynomial_spec(
    base_model: nn.Module,
    config,
    ranges: dict[str, dict[str, float]] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    margin: float = DEFAULT_MARGIN,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The `config.polynomial` description: per-site domains (from `ranges`, else the defaults)."""
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    if not margin >= 1:
        raise ValueError(f"margin must be >= 1, got {margin}")
    merged = {kind: {**DEFAULT_OPTIONS[kind], **(options or {}).get(kind, {})} for kind in DEFAULT_OPTIONS}
    unknown = set(options or {}) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown approximation kinds {sorted(unknown)}; expected {sorted(DEFAULT_OPTIONS)}")
    power = config.attn_power
    sites: dict[str, dict[str, Any]] = {}

    for name in score_scaled_attentions(base_model):
        observed = (ranges or {}).get(f"{name}.score_probe")
        sites[name] = {"score_scale": observed["absmax"] if observed else DEFAULT_SCORE_SCALE}

    for name, op in approximated_ops(base_model).items():
        observed = (ranges or {}).get(name)
        if op.kind == "reciprocal":
            attention = name.rsplit(".", 1)[0]
            scale = sites[attention]["score_scale"]
            floor = normaliser_floor(config, scale)
            if observed:  # recorded unscaled: the form divides scores by C, the normaliser by C^p
                low, high = observed["min"] / scale**power, observed["max"] / scale**power
                # No normaliser is below the floor (eps / C^p): the floor bounds the domain for any
                # text. The top keeps one margin: under CKKS the balanced normaliser's noise grows
                # with sqrt(top / floor) (a wider top cost a random d=48 model 2x its logit error),
                # so a long-tailed model needs more calibration text rather than a wider top (SmolLM2:
                # 32 blocks of 128 left held-out rows 6x above it, 64 blocks of 256 none).
                domain = _positive_domain(floor or low, high, margin, floor)
            else:
                # |score| <= C makes the mean of x^p at most 1 and the sum at most the length.
                top = 1.0 if config.attn_form == "mean" else float(config.max_position_embeddings)
                domain = [max(floor, 1e-4), top]
        elif op.kind == "inv_sqrt":
            # the top twice: held-out variances reach 2.2x the calibrated maximum (a tiny model's
            # attention-sink tokens), and a polynomial guess diverges just outside its domain
            domain = _positive_domain(observed["min"], observed["max"] * margin, margin) if observed else DEFAULT_DOMAINS["inv_sqrt"]
        else:
            domain = _activation_domain(observed["min"], observed["max"]) if observed else DEFAULT_DOMAINS["activation"]
        extra = {"function": config.hidden_act} if op.kind == "activation" else {}
        if op.kind != "activation" or merged["activation"].get("degree") == "auto":
            extra["tolerance"] = tolerance
        approximation = build_approximation({"kind": op.kind, "domain": list(domain), **merged[op.kind], **extra})
        sites[name] = approximation.spec()

    return {
        "enabled": True,
        "calibrated": ranges is not None,
        "tolerance": tolerance,
        "margin": margin,
        "options": merged,
        "sites": sites,
    }


def install_polynomial(base_model: nn.Module, spec: dict[str, Any], check_domain: bool = True) -> None:
    """Switch every approximated step to the approximation `spec` describes."""
    sites = spec["sites"]
    ops, attentions = approximated_ops(base_model), score_scaled_attentions(base_model)
    missing = (set(ops) | set(attentions)) - set(sites)
    if missing:
        raise ValueError(f"config.polynomial has no entry for {sorted(missing)}; rebuild it with to_polynomial()")
    for name, attention in attentions.items():
        attention.set_score_scale(float(sites[name]["score_scale"]))
    for name, op in ops.items():
        # Rebuilding means refitting and re-sweeping: reuse the last approximation when it is the same.
        op.install(op.reusable(sites[name]) or build_approximation(sites[name]), name, check_domain)


def remove_polynomial(base_model: nn.Module) -> None:
    """Back to the exact model (the description stays in the config, disabled)."""
    for attention in score_scaled_attentions(base_model).values():
        attention.set_score_scale(None)
    for op in approximated_ops(base_model).values():
        op.remove()


def polynomial_report(base_model: nn.Module, config, normaliser_resolution: float | None = None,
                      slots: int | None = None) -> dict[str, Any]:
    """Per-site approximations and the multiplicative depth of each block and of the model.

    The depths are measured, not stated: the one-token step of `circuit.DecoderCircuit` (the
    code the CKKS server runs) on symbolic ciphertexts, from a fresh input, with each
    approximation's input map folded into the product before it (see `circuit.py`).
    `normaliser_resolution`: a ring's smallest resolvable normaliser (`CKKSServer` uses its
    precision over `PRECISION_LIMIT`); a layer whose folded normaliser falls below it pays one
    level more. `None`: every fold taken. `slots`: a ring's slot count; the KV cache is then packed
    (`CircuitPlan.kv_copies`), which costs a level per block where the copies of the attention
    width do not fill the slots (`kv_copies` below the most). `None`: no ring, no packing.
    """
    from .circuit import CircuitPlan, circuit_depths

    ops = approximated_ops(base_model)
    if not ops or any(op.approximation is None for op in ops.values()):
        raise ValueError("the model is not in polynomial form; call to_polynomial() first")
    sites = {name: op.approximation.describe() for name, op in ops.items()}
    depths = circuit_depths(CircuitPlan.from_model(base_model, normaliser_resolution, slots=slots))
    evaluations_per_token = {
        # per layer: 2 norms (+2 sandwich norms, + a norm per query head and per KV head), + the final norm
        "inv_sqrt": config.num_hidden_layers
        * (2 + 2 * config.sandwich_norms + config.qk_norm * (config.num_attention_heads + config.num_key_value_heads))
        + 1,
        "reciprocal": config.num_hidden_layers * config.num_attention_heads,
        "activation": config.num_hidden_layers * config.intermediate_size,
    }
    return {
        "sites": sites,
        **depths,
        "evaluations_per_token": evaluations_per_token,
        "calibrated": bool((config.polynomial or {}).get("calibrated")),
    }


def format_polynomial_report(report: dict[str, Any]) -> str:
    """The report as a text table."""
    lines = [
        f"{'site':44} {'kind':10} {'domain':>24} {'depth':>5} {'ct×ct':>6} {'ct×pt':>6} {'max error':>12}",
    ]
    for name, site in report["sites"].items():
        domain = f"[{site['domain'][0]:.3g}, {site['domain'][1]:.3g}]"
        error = f"{site['max_error']:.2e} {site['error_kind'][:3]}"
        lines.append(
            f"{name:44} {site['kind']:10} {domain:>24} {site['depth']:>5} {site['ct_ct']:>6} {site['ct_pt']:>6} {error:>12}"
        )
    lines.append("")
    for block in report["blocks"]:
        lines.append(
            f"block {block['block']}: depth {block['depth']} (attention {block['attention_depth']}, mlp {block['mlp_depth']})"
        )
    lines.append(f"final norm + LM head: depth {report['head_depth']}")
    lines.append(f"total multiplicative depth: {report['total_depth']}")
    per_token = ", ".join(f"{k} {v}" for k, v in report["evaluations_per_token"].items())
    lines.append(f"approximation evaluations per token: {per_token}")
    if not report["calibrated"]:
        lines.append("domains: DEFAULTS (not calibrated)")
    return "\n".join(lines)
