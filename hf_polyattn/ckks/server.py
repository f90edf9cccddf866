"""The server: a PolyAttn model in polynomial form evaluated on ciphertexts, token by token.

The circuit itself is `hf_polyattn.modeling.circuit.DecoderCircuit`, the same code the depth
report and the planner run symbolically; this module gives it ciphertexts (`Cipher`) and the
plaintext matrices it multiplies by, with every public factor folded in (see `circuit.py`).

Packing (one token at a time, as in generation): a token's hidden state is one ciphertext
holding its `d` values repeated over all N/2 slots (TenSEAL's layout). Every linear step is a
plaintext-matrix × ciphertext product (one level): baby-step giant-step on raw SEAL,
`≈ 2·sqrt(rows)` rotations and `rows` plaintext products, for every shape; the head sums and the
norms' mean of squares (block-diagonal matrices of ones) by `~2·log2(block)` rotations and one
masked product (`matmul.py`). Attention of query `t` runs over the encrypted K/V of tokens
`≤ t` kept from earlier steps (the encrypted KV cache), so a token costs one incremental step.
The cache is packed: as many positions per ciphertext as the slots hold copies of the attention
width (`kv_copies`; see `circuit.py`; where a product's size does not divide the slots, as many as
end before the projections read past the cut copy, their input refreshed first), so the per-key
work is paid once per ciphertext.
"""

import math
import warnings

import numpy as np
import torch

from ..modeling.circuit import CircuitPlan, DecoderCircuit, NormSite, ShapeMatrices, symbolic_run
from .cipher import CipherEngine
from .matmul import (
    BlockSumMatrix, CopyMask, CopySpread, EncodingBudget, PlaintextMatrix, RotaryMatrix, copy_slots,
    require_supported_product,
)
from .params import PRECISION_LIMIT, CKKSParameters
from .profiler import LatencyProfiler
from .refresh import Refresher


def _weight(linear) -> np.ndarray:
    return linear.weight.detach().double().numpy().T  # (in, out)


class LayerMatrices:
    """The plaintext matrices of one decoder layer, with the public factors folded in."""

    def __init__(self, layer, plan: CircuitPlan, block):
        attention = layer.self_attn
        heads, kv_heads, head_dim = plan.heads, plan.kv_heads, plan.head_dim
        group = heads // kv_heads
        # The residual stream runs scaled by s (`CircuitPlan.residual_scale`): the products reading
        # a norm's output (which carries s) take 1/s, those writing the residual take s.
        # (and a balanced Newton step's √c, `NormSite.output_gain`)
        scale = plan.residual_scale
        gamma1 = layer.input_layernorm.weight.detach().double().numpy()[:, None] * block.input_norm.output_gain / scale
        gamma2 = layer.post_attention_layernorm.weight.detach().double().numpy()[:, None] * block.post_attention_norm.output_gain / scale
        self.expand_kv = np.zeros((kv_heads * head_dim, heads * head_dim))
        for head in range(heads):
            kv = head // group
            self.expand_kv[kv * head_dim : (kv + 1) * head_dim, head * head_dim : (head + 1) * head_dim] = np.eye(head_dim)
        self.plan, self.heads, self.head_dim = plan, heads, head_dim
        self.score_factor = attention.scaling / block.attention.score_scale
        activation_scale = block.activation.mapping[0]
        self.fixed = {
            # RoPE is the position's own product after these (`ServerMatrices.rope`), so these are encoded once
            "query": PlaintextMatrix(gamma1 * _weight(attention.q_proj) * self.score_factor),
            "out": PlaintextMatrix(_weight(attention.o_proj) * scale),
            "gate": PlaintextMatrix(activation_scale * gamma2 * _weight(layer.mlp.gate_proj)),
            "up": PlaintextMatrix(gamma2 * _weight(layer.mlp.up_proj)),
            "down": PlaintextMatrix(_weight(layer.mlp.down_proj) * scale),
        }
        key = (gamma1 * _weight(attention.k_proj)) @ self.expand_kv
        value = (gamma1 * _weight(attention.v_proj)) @ self.expand_kv
        if plan.fuses_key_value:  # one product: the key in the even copies, the value in the odd
            self.fixed["key_value"] = PlaintextMatrix(np.concatenate([key, value], axis=1), copy_columns=(2, plan.width))
        else:
            self.fixed["key"], self.fixed["value"] = PlaintextMatrix(key), PlaintextMatrix(value)
        self.gain = block.attention.gain
        if not plan.mean_form:  # the sum form's head sums do not depend on the position
            self.fixed["score_sum"] = self._score_sum(self.gain)
        self._at: tuple[int, BlockSumMatrix] | None = None

    def _score_sum(self, factor: float) -> BlockSumMatrix:
        # Sums each head's q ⊙ k and spreads it over the head's slots, times factor^(1/p): the
        # powers then carry the factor the reciprocal's input needs (g, and 1/L in the mean form).
        # By rotations (`BlockSumMatrix`), a cost paid once per cached key.
        return BlockSumMatrix(self.heads * self.head_dim, self.head_dim, factor ** (1 / self.plan.power))

    def at(self, name: str, position: int) -> PlaintextMatrix:
        """A matrix of this layer: its fixed weights, or the mean form's head sums of `position`."""
        if name in self.fixed:
            return self.fixed[name]
        if name != "score_sum":
            raise KeyError(f"no {name!r} matrix in a layer")
        # each position is used once per sequence: keep only the latest
        if self._at is None or self._at[0] != position:
            self._at = (position, self._score_sum(self.gain / (position + 1)))
        return self._at[1]


class ServerMatrices:
    """What `DecoderCircuit` multiplies by on the server: encoded once, reused every step."""

    def __init__(self, model, plan: CircuitPlan, lm_head: bool):
        base = model.model
        self.plan = plan
        self.layers = [LayerMatrices(layer, plan, block) for layer, block in zip(base.layers, plan.blocks)]
        self._rotary = base.rotary_emb  # one RoPE for every layer (`require_encryptable`)
        self._rope: tuple[int, dict] | None = None
        gamma = base.norm.weight.detach().double().numpy()[:, None] * plan.final_norm.output_gain / plan.residual_scale
        self.head = PlaintextMatrix(gamma * model.lm_head.weight.detach().double().numpy().T) if lm_head else None
        self._norm_sums: dict[str, PlaintextMatrix] = {}
        # the packed KV cache's slot-wise products (one mask per copy), shared by every layer
        self.copy_masks = [CopyMask(plan.width, plan.slots, copy) for copy in range(plan.kv_copies)] if plan.kv_copies > 1 else []
        self.copy_spread = CopySpread(plan.width, plan.slots) if plan.kv_copies > 1 else None

    def matrix(self, name: str, block: int | None = None, position: int | None = None, site: NormSite | None = None):
        if name == "norm_sum":  # Σ x² times a/n, in every slot: the inverse sqrt's input, no broadcast after
            if site.name not in self._norm_sums:
                self._norm_sums[site.name] = BlockSumMatrix(site.width, site.size, site.mean_factor)
            return self._norm_sums[site.name]
        if name == "head":
            return self.head
        if name == "copy_mask":
            return self.copy_masks[position % len(self.copy_masks)]
        if name == "copy_spread":
            return self.copy_spread
        if name in ("query_rope", "key_rope"):
            return self.rope(position)[name]
        return self.layers[block].at(name, position)

    def rope(self, position: int) -> dict[str, RotaryMatrix]:
        """The query's and key's RoPE at `position`, shared by every layer (their slot vectors are
        encoded once per level, not once per layer); the key's written into its copy of the packed
        cache only. Each position is used once per sequence: only the latest is kept."""
        if self._rope is None or self._rope[0] != position:
            plan = self.plan
            dummy = torch.zeros(1, 1, plan.head_dim, dtype=torch.float64)
            cos, sin = (t[0, 0].double().numpy() for t in self._rotary(dummy, position_ids=torch.tensor([[position]])))
            copy = None if plan.kv_copies == 1 else copy_slots(plan.width, plan.slots, position % plan.kv_copies)
            self._rope = (position, {"query_rope": RotaryMatrix(cos, sin, plan.heads),
                                     "key_rope": RotaryMatrix(cos, sin, plan.heads, output_slots=copy)})
        return self._rope[1]


def circuit_options(params: CKKSParameters, refreshes: bool = True, kv_copies: int | None = None) -> dict:
    """What a ring adds to a model's circuit (`CircuitPlan.from_model`'s options): the smallest
    attention normaliser it resolves (its precision over `PRECISION_LIMIT`), the largest value a
    circuit may form (what a refresh carries when refreshes are on, since the client refuses more
    than its mask bound `R`; else what the ring holds), and its slots for the packed KV cache."""
    return {
        "normaliser_resolution": params.precision / PRECISION_LIMIT,
        "value_limit": params.mask_bound if refreshes else params.value_bound,
        "slots": params.slots,
        "kv_copies": kv_copies,
    }


def require_encryptable(model) -> None:
    """Refuse a model CKKS cannot run, naming the step to run first."""
    if not getattr(model, "is_polynomial", False):
        raise ValueError(
            "encrypted inference runs the polynomial form: call model.to_polynomial(calibration_data=...) first "
            "(or `hf-polyattn polynomialize`)"
        )
    if not model.config.polynomial.get("calibrated"):
        raise ValueError(
            "the model's polynomial domains were never calibrated: run model.to_polynomial(calibration_data=...) "
            "on representative text first"
        )
    config = model.config
    if config.num_hidden_layers == 0:
        raise ValueError("this is a client's copy of a model (no decoder layers): it drives a server "
                         "(server='ws://...'), it cannot be one; serve the whole model")
    rotary = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    layout = {
        "norm_type": (config.norm_type, "rms"),
        "mlp_type": (config.mlp_type, "gated"),
        "parallel_residual": (config.parallel_residual, False),
        "position_embedding_type": (config.position_embedding_type, "rope"),
        "attention_bias": (config.attention_bias, False),
        "mlp_bias": (config.mlp_bias, False),
        "partial_rotary_factor": (rotary, 1.0),
        "sandwich_norms": (config.sandwich_norms, False),
        "qk_norm": (config.qk_norm, False),
        "embedding_multiplier": (config.embedding_multiplier, 1.0),
        "layer_rope_theta": (config.layer_rope_theta, None),
        "query_pre_attn_scalar": (config.query_pre_attn_scalar, None),
    }
    different = {name: value for name, (value, llama) in layout.items() if value != llama}
    if different:
        raise NotImplementedError(
            f"the CKKS server evaluates the Llama layout (RMSNorm, gated MLP, no biases, full RoPE); this model "
            f"has {different}. Run it in plaintext polynomial form, or convert from a Llama-family checkpoint."
        )
    # SEAL would refuse a NaN/inf plaintext with "values must be finite", naming nothing, and the
    # LM head's only after a whole encrypted step: name the tensor before any key is made.
    broken = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if broken:
        raise ValueError(f"the model has non-finite (NaN/inf) weights in {broken[:5]}: CKKS encodes only finite values")


class CKKSServer:
    """Evaluates a polynomial-form PolyAttn model on ciphertexts; holds only public keys.

    Everything it needs from `model` is copied when it is built (the approximations, the folded
    matrices), so changing the model afterwards (`to_exact()`, recalibrating) leaves it unchanged.

    Args:
        model: a `PolyAttnForCausalLM` in calibrated polynomial form (its plaintext twin).
        public_context: `CKKSClient.public_context()`; a context with a secret key is refused.
        refresher: how exhausted ciphertexts are refreshed (e.g. `ClientRoundTrip(client)`);
            `None` forbids refreshing (then a model deeper than the ring fails before starting).
        lm_head: return encrypted logits (`True`) or the encrypted final normalised hidden state
            before the norm weight (`False`: the client applies `norm.weight` and the LM head).
        max_tokens: the longest sequence a session accepts (the KV cache grows with it).
        encoding_budget: bytes of encoded weight diagonals kept between products (default: half
            the memory available; a 30-layer SmolLM2 needs ~1 GB a layer); past it they are
            encoded again at each use, slower but the same result.
        kv_copies: cached positions packed per KV ciphertext (default: as many copies of the
            attention width as the slots hold, e.g. 64 for the embedded model on 4096 slots; where
            a product's size does not divide the slots, as many as end before the query and key
            read past the cut copy, e.g. 6 for SmolLM2's 576; `circuit.kv_copies_for`); 1: one
            ciphertext per position.
    """

    def __init__(
        self,
        model,
        public_context: bytes,
        refresher: Refresher | None = None,
        profiler: LatencyProfiler | None = None,
        lm_head: bool = True,
        max_tokens: int = 64,
        encoding_budget: int | None = None,
        kv_copies: int | None = None,
    ):
        require_encryptable(model)
        self.engine = CipherEngine(public_context, refresher, profiler, EncodingBudget(encoding_budget))
        self.params = CKKSParameters.from_context(self.engine.context)  # the client's ring, as the keys say
        self.hidden_size = model.config.hidden_size
        self.max_tokens = max_tokens
        self.lm_head = lm_head
        self.circuit_plan = CircuitPlan.from_model(
            model, **circuit_options(self.params, refreshes=refresher is not None, kv_copies=kv_copies)
        )
        self.circuit = DecoderCircuit(self.circuit_plan, ServerMatrices(model, self.circuit_plan, lm_head), self.engine.profiler, lm_head)
        self._check_budget()

    @property
    def profiler(self) -> LatencyProfiler:
        return self.engine.profiler

    def value_limit(self) -> float:
        """The largest value the circuit may form (`circuit_options`)."""
        return circuit_options(self.params, self.engine.refresher is not None)["value_limit"]

    def precision(self) -> float:
        """The typical absolute error of a value on this ring (`CKKSParameters.precision`)."""
        return self.params.precision

    def _check_budget(self) -> None:
        """Refuse, before any ciphertext exists, what the ring cannot carry."""
        shapes = ShapeMatrices(self.circuit_plan)
        names = ("query", "value", "score_sum", "out", "gate", "down") + (("head",) if self.lm_head else ())
        for rows, cols in [shapes.matrix(name).shape for name in names] + [(self.hidden_size, self.hidden_size)]:
            require_supported_product(rows, cols, self.engine.seal.slots)
        # A value may reach a refresh, and a client refreshes only values within its mask bound R
        # (x + r must stay in what the ring holds): with refreshes on, R is the limit.
        limit = self.value_limit()
        what = "a refresh carries (the mask bound R; the client refuses more)" if self.engine.refresher is not None else "this ring holds"
        for block in self.circuit_plan.blocks:
            low, high = block.attention.reciprocal.domain
            largest = max(1.0 / low, high)  # 1/x at the bottom of the domain, the powers at the top
            if largest > limit:
                raise ValueError(
                    f"layer {block.index}: the attention normaliser spans [{low / block.attention.gain:.3g}, "
                    f"{high / block.attention.gain:.3g}]; its scaled powers and reciprocal reach {largest:.3g}, beyond "
                    f"what {what} (~{limit:.3g}); raise attn_eps, or the ring's first prime over its scale"
                )
        plan = self.circuit_plan
        norms = [site for block in plan.blocks for site in (block.input_norm, block.post_attention_norm)] + [plan.final_norm]
        for site in norms:
            if site.balance == 1.0:  # `CircuitPlan.from_model` balanced every norm whose x/2 passes `limit`
                continue
            low, high = site.approximation.domain
            # balanced, Newton's values stay within sqrt(high/low); past the limit a refresh of them
            # is refused, if the level schedule refreshes them (only then: a warning, not a refusal)
            largest = math.sqrt(high / low)
            if largest > limit:
                warnings.warn(
                    f"{site.name}: Newton's inverse square root forms values up to {largest:.3g} (its calibrated "
                    f"domain [{low:.3g}, {high:.3g}], mean(x²) of the residual), beyond what {what} (~{limit:.3g}): "
                    "where such a value is refreshed, the client refuses it mid-sequence. Narrower norm inputs "
                    "(the range loss) or a ring with more headroom (fewer scale bits) avoid it",
                    RuntimeWarning, stacklevel=3,
                )
        precision = self.precision()
        if precision / self.smallest_normaliser() > PRECISION_LIMIT:
            raise ValueError(
                f"this ring's precision (~{precision:.1e}) is too coarse for the model's attention normaliser "
                f"(smallest scaled value {self.smallest_normaliser():.2e}, ratio above {PRECISION_LIMIT}): 1/x would "
                "amplify the noise into wrong logits. Raise attn_eps (relative to the score scale^p) or scale_bits"
            )
        if self.engine.refresher is None:
            try:
                symbolic_run(self.circuit_plan, 1, self.engine.top_level, refresh_allowed=False, lm_head=self.lm_head)
            except ValueError as error:
                raise ValueError(
                    f"one token's step needs more than the ring's {self.engine.top_level} levels and refreshing is disabled"
                ) from error

    def smallest_normaliser(self) -> float:
        """The smallest (scaled) attention normaliser any layer takes 1/x of."""
        return min(block.attention.reciprocal.domain[0] for block in self.circuit_plan.blocks)

    def reset(self) -> None:
        """Start a new sequence: drop the encrypted KV cache."""
        self.circuit.reset()

    @property
    def position(self) -> int:
        return self.circuit.position

    def step(self, embedding: bytes) -> bytes:
        """One token: its encrypted embedding in, encrypted logits (or final hidden state) out."""
        if self.position >= self.max_tokens:
            raise ValueError(f"the sequence is longer than max_tokens={self.max_tokens}; reset() or raise the limit")
        hidden = self.engine.load(embedding)
        if hidden.size != self.hidden_size:
            raise ValueError(f"an embedding of size {hidden.size} for a model of hidden size {self.hidden_size}")
        return self.circuit.step(hidden).serialize()

    def plan(self, num_tokens: int, top_level: int | None = None) -> dict:
        """Predicted levels consumed and refreshes for `num_tokens` steps, before any ciphertext."""
        from .planner import plan

        return plan(self, num_tokens, top_level)
