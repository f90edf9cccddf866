"""The server: a PolyAttn model in polynomial form evaluated on ciphertexts, token by token.

Packing (one token at a time, as in generation): a token's hidden state is one ciphertext
holding its `d` values repeated over all N/2 slots (TenSEAL's layout). Every linear step is a
plaintext-matrix × ciphertext product (one level): baby-step giant-step on raw SEAL,
`≈ 2·sqrt(rows)` rotations and `rows` plaintext products, when `rows` divides N/2, else
TenSEAL's `matmul` (`matmul.py`). What is public is folded into the matrices:

- the norm weights `γ` into the next projection; RoPE of position `t` into `W_q` / `W_k` (a
  block-diagonal rotation, positions are public); `1/sqrt(head_dim)` and the score scale
  `1/C` into `W_q`; grouped KV heads into `W_k` / `W_v` (each KV head copied to its query heads).
- the norm's mean and the head sums of `q ⊙ k` into small summing matrices, their broadcasts
  back into expansion matrices.

Attention of query `t` runs over the encrypted K/V of tokens `≤ t` kept from earlier steps
(the encrypted KV cache), so a token costs one incremental step. Per layer and token (d=64,
4 heads, MLP 128, N=8192): 7 projection products (q, k, v, o: 14 rotations each; gate, up: 14;
down: 22), 4 norm products (mean: 14 rotations, broadcast: 0), 2·(t+1) head products (sums: 14
rotations, broadcasts: 2) with 2·(t+1) ct×ct products for scores and AV, and the
approximations of `hf_polyattn.modeling.polynomial` evaluated on the ciphertexts.
"""

import math

import numpy as np
import torch

from .cipher import Cipher, CipherEngine
from .matmul import PlaintextMatrix
from .params import PRECISION_LIMIT, ckks_precision
from .profiler import LatencyProfiler
from .refresh import Refresher


def _rope_matrix(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """`R` with `x @ R = x·cos + rotate_half(x)·sin` for one head (transformers' Llama RoPE)."""
    dim = cos.shape[0]
    half = dim // 2
    rotation = np.diag(cos)
    for i in range(half):
        rotation[i + half, i] = -sin[i]
        rotation[i, i + half] = sin[i + half]
    return rotation


class EncryptedLayer:
    """The plaintext matrices of one decoder layer, in the shapes the packing needs."""

    def __init__(self, layer, config, model_rotary):
        attention = layer.self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = attention.head_dim
        group = self.heads // self.kv_heads
        width = self.heads * self.head_dim

        def weight(linear) -> np.ndarray:
            return linear.weight.detach().double().numpy().T  # (in, out)

        gamma1 = layer.input_layernorm.weight.detach().double().numpy()[:, None]
        gamma2 = layer.post_attention_layernorm.weight.detach().double().numpy()[:, None]
        expand_kv = np.zeros((self.kv_heads * self.head_dim, width))
        for head in range(self.heads):
            kv = head // group
            expand_kv[kv * self.head_dim : (kv + 1) * self.head_dim, head * self.head_dim : (head + 1) * self.head_dim] = np.eye(self.head_dim)
        self.score_factor = attention.scaling / attention.score_scale
        self.wq = gamma1 * weight(attention.q_proj)
        self.wk = gamma1 * weight(attention.k_proj)
        self.wv = PlaintextMatrix((gamma1 * weight(attention.v_proj)) @ expand_kv)
        self.expand_kv = expand_kv
        self.wo = PlaintextMatrix(weight(attention.o_proj))
        self.wgate = PlaintextMatrix(gamma2 * weight(layer.mlp.gate_proj))
        self.wup = PlaintextMatrix(gamma2 * weight(layer.mlp.up_proj))
        self.wdown = PlaintextMatrix(weight(layer.mlp.down_proj))
        # The normaliser's 1/x can exceed what the ring holds: scale the powers by `balance` (its
        # p-th root folded into the head sums) and take 1/(balance·normaliser), so the powers and
        # the reciprocal both stay below sqrt(high/low) while their product is unchanged.
        low, high = attention.reciprocal.approximation.domain
        self.balance = 1.0 / math.sqrt(low * high)
        self.head_sum = PlaintextMatrix(np.kron(np.eye(self.heads), np.ones((self.head_dim, 1))) * self.balance ** (1 / config.attn_power))
        self.head_expand = PlaintextMatrix(np.kron(np.eye(self.heads), np.ones((1, self.head_dim))))
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.reciprocal = attention.reciprocal.approximation.rescaled(self.balance)
        self.activation = layer.mlp.act_fn.approximation
        self.power = config.attn_power
        self.mean_form = config.attn_form == "mean"
        self.floor = self.balance * config.attn_eps / attention.score_scale**config.attn_power
        self._rotary = model_rotary
        self._per_position: dict[int, tuple] = {}

    def projections_at(self, position: int) -> tuple[PlaintextMatrix, PlaintextMatrix]:
        """`W_q`, `W_k` with RoPE of `position` (and the score scaling) folded in."""
        # Each position is used once per sequence: keep only the latest (a dict of every
        # position would hold L·T matrices as Python lists: gigabytes at d=576, T=128).
        if position not in self._per_position:
            self._per_position.clear()
            dummy = torch.zeros(1, 1, self.head_dim, dtype=torch.float64)
            cos, sin = self._rotary(dummy, position_ids=torch.tensor([[position]]))
            rope = _rope_matrix(cos[0, 0].double().numpy(), sin[0, 0].double().numpy())
            wq = self.wq @ np.kron(np.eye(self.heads), rope) * self.score_factor
            wk = self.wk @ np.kron(np.eye(self.kv_heads), rope) @ self.expand_kv
            self._per_position[position] = (PlaintextMatrix(wq), PlaintextMatrix(wk))
        return self._per_position[position]


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


class CKKSServer:
    """Evaluates a polynomial-form PolyAttn model on ciphertexts; holds only public keys.

    Args:
        model: a `PolyAttnForCausalLM` in calibrated polynomial form (its plaintext twin).
        public_context: `CKKSClient.public_context()`; a context with a secret key is refused.
        refresher: how exhausted ciphertexts are refreshed (e.g. `ClientRoundTrip(client)`);
            `None` forbids refreshing (then a model deeper than the ring fails before starting).
        lm_head: return encrypted logits (`True`) or the encrypted final normalised hidden state
            before the norm weight (`False`: the client applies `norm.weight` and the LM head).
        max_tokens: the longest sequence a session accepts (the KV cache grows with it).
    """

    def __init__(
        self,
        model,
        public_context: bytes,
        refresher: Refresher | None = None,
        profiler: LatencyProfiler | None = None,
        lm_head: bool = True,
        max_tokens: int = 64,
    ):
        config = model.config
        require_encryptable(model)
        self.engine = CipherEngine(public_context, refresher, profiler)
        self.config = config
        self.max_tokens = max_tokens
        base = model.model
        self.layers = [EncryptedLayer(layer, config, base.rotary_emb) for layer in base.layers]
        self.final_norm = base.norm
        gamma = base.norm.weight.detach().double().numpy()[:, None]
        self.head = PlaintextMatrix(gamma * model.lm_head.weight.detach().double().numpy().T) if lm_head else None
        size = config.hidden_size
        # the norms' mean of squares and the broadcast of its inverse square root
        self.mean_of = PlaintextMatrix(np.full((size, 1), 1.0 / size))
        self.broadcast = PlaintextMatrix(np.ones((1, size)))
        self._check_budget()
        self.reset()

    @property
    def profiler(self) -> LatencyProfiler:
        return self.engine.profiler

    def _check_budget(self) -> None:
        """Refuse, before any ciphertext exists, what the ring cannot carry."""
        limit = 2.0 ** (self.engine.context.seal_context().data.last_context_data().total_coeff_modulus_bit_count() - math.log2(self.engine.context.global_scale) - 2)
        for index, layer in enumerate(self.layers):
            low, high = layer.reciprocal.domain
            if math.sqrt(high / low) > limit:
                raise ValueError(
                    f"layer {index}: the attention normaliser spans [{low / layer.balance:.3g}, {high / layer.balance:.3g}]; "
                    f"its balanced powers and reciprocal reach {math.sqrt(high / low):.3g}, beyond what this ring holds "
                    f"(~{limit:.3g}); raise attn_eps or the ring's first prime"
                )
        context = self.engine.context
        precision = ckks_precision(math.log2(context.global_scale), context.seal_context().data.first_context_data().parms().poly_modulus_degree())
        if precision / self.smallest_normaliser() > PRECISION_LIMIT:
            raise ValueError(
                f"this ring's precision (~{precision:.1e}) is too coarse for the model's attention normaliser "
                f"(smallest balanced value {self.smallest_normaliser():.2e}, ratio above {PRECISION_LIMIT}): 1/x would "
                "amplify the noise into wrong logits. Raise attn_eps (relative to the score scale^p) or scale_bits"
            )
        if self.engine.refresher is None:
            needed = max(
                op.depth
                for layer in self.layers
                for op in (layer.reciprocal, layer.activation, layer.norm1.inv_sqrt.approximation)
            )
            if needed > self.engine.top_level:
                raise ValueError(
                    f"the model needs {needed} levels in one approximation but the ring has {self.engine.top_level} "
                    "and refreshing is disabled"
                )

    def smallest_normaliser(self) -> float:
        """The smallest attention normaliser (balanced) any layer takes 1/x of."""
        return min(layer.reciprocal.domain[0] for layer in self.layers)

    def reset(self) -> None:
        """Start a new sequence: drop the encrypted KV cache."""
        self.keys: list[list[Cipher]] = [[] for _ in self.layers]
        self.values: list[list[Cipher]] = [[] for _ in self.layers]

    @property
    def position(self) -> int:
        return len(self.keys[0])

    def _norm(self, x: Cipher, norm) -> Cipher:
        with self.profiler.step("norm"):
            mean = (x * x).matmul(self.mean_of)
            inv = norm.inv_sqrt.approximation.circuit(mean + norm.variance_epsilon)
            return x * inv.matmul(self.broadcast)

    def _attention(self, index: int, layer: EncryptedLayer, y: Cipher) -> Cipher:
        wq, wk = layer.projections_at(self.position)
        with self.profiler.step("pt×ct matmul"):
            q, k, v = y.matmul(wq), y.matmul(wk), y.matmul(layer.wv)
        self.keys[index].append(k)
        self.values[index].append(v)
        with self.profiler.step("ct×ct matmul"):
            scores = [(q * key).matmul(layer.head_sum) for key in self.keys[index]]
        with self.profiler.step("power-softmax"):
            powers = [_power(s, layer.power) for s in scores]
            total = powers[0]
            for term in powers[1:]:
                total = total + term
            if layer.mean_form:
                total = total * (1.0 / len(powers))
        with self.profiler.step("reciprocal"):
            inverse = layer.reciprocal.circuit(total + layer.floor)
            if layer.mean_form:
                inverse = inverse * (1.0 / len(powers))
        with self.profiler.step("ct×ct matmul"):
            out = None
            for term, value in zip(powers, self.values[index]):
                weighted = (term * inverse).matmul(layer.head_expand) * value
                out = weighted if out is None else out + weighted
        with self.profiler.step("pt×ct matmul"):
            return out.matmul(layer.wo)

    def step(self, embedding: bytes) -> bytes:
        """One token: its encrypted embedding in, encrypted logits (or final hidden state) out."""
        if self.position >= self.max_tokens:
            raise ValueError(f"the sequence is longer than max_tokens={self.max_tokens}; reset() or raise the limit")
        hidden = self.engine.load(embedding)
        if hidden.size != self.config.hidden_size:
            raise ValueError(f"an embedding of size {hidden.size} for a model of hidden size {self.config.hidden_size}")
        return self._forward(hidden).serialize()

    def plan(self, num_tokens: int, top_level: int | None = None) -> dict:
        """Predicted levels consumed and refreshes for `num_tokens` steps, before any ciphertext."""
        from .planner import plan

        return plan(self, num_tokens, top_level)

    def _forward(self, hidden: Cipher) -> Cipher:
        """The circuit of one token, on `Cipher`s or on the planner's stand-ins."""
        for index, layer in enumerate(self.layers):
            with self.profiler.scope(f"layer {index}"):
                hidden = hidden + self._attention(index, layer, self._norm(hidden, layer.norm1))
                y = self._norm(hidden, layer.norm2)
                with self.profiler.step("pt×ct matmul"):
                    gate, up = y.matmul(layer.wgate), y.matmul(layer.wup)
                with self.profiler.step("activation"):
                    activated = layer.activation.circuit(gate)
                with self.profiler.step("pt×ct matmul"):
                    hidden = hidden + (activated * up).matmul(layer.wdown)
        with self.profiler.scope("head"):
            out = self._norm(hidden, self.final_norm)
            if self.head is not None:
                with self.profiler.step("pt×ct matmul"):
                    out = out.matmul(self.head)
        return out


def _power(x: Cipher, power: int) -> Cipher:
    """`x^power` for an even power by repeated squaring (depth ceil(log2 p))."""
    result, base, exponent = None, x, power
    while exponent:
        if exponent & 1:
            result = base if result is None else result * base
        exponent >>= 1
        if exponent:
            base = base * base
    return result
