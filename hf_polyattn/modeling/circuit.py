"""The circuit of one token's step through a PolyAttn model, written once for every backend.

`DecoderCircuit` runs a token's hidden state through every block and the head with `+`, `-`,
`*` and `matmul` alone, keeping the keys and values of earlier tokens (the KV cache). What it
runs on is the caller's: the CKKS server gives it `Cipher`s and encoded `PlaintextMatrix`es;
the depth report, the planner and the tests give it `SymbolicCipher`s and matrix shapes. So the
levels the report states, the refreshes the planner predicts and the levels the server consumes
all come from this one piece of code.

`CircuitPlan.from_model` snapshots what the circuit needs from a model in polynomial form: every
approximation (immutable objects, so a later `to_exact()` or recalibration of the model leaves a
built circuit unchanged) and the constants that fold each approximation's input map into the
plaintext product before it, at no level cost:

- a norm's inverse square root reads `t = a·(mean(x²) + eps) + b`: `a/n` goes into the
  all-ones matrix that sums the squares (its output is the mean in every slot, so no broadcast
  product follows), `a·eps + b` is an addition;
- the attention normaliser's reciprocal reads `t = a·u + b` with `u` the calibrated normaliser:
  `a^(1/p)` (and `1/L` in the mean form) goes into the matrix that sums each head's `q ⊙ k` and
  spreads it over the head's slots, so the powers carry the same factor and `powers × (1/(a·u))`
  are the exact attention weights. Where the ring cannot resolve the smallest `a·u` (its
  precision, `normaliser_resolution`), the factor is `1/sqrt(low·high)` instead, which keeps the
  powers and the reciprocal both below `sqrt(high/low)`, and the map costs its product (a level);
  a constant initial guess reads `u` itself and is always balanced that way;
- the activation reads `t = a·gate + b`: `a` goes into the gate projection.

The powers multiply the values while the reciprocal is computed, so the reciprocal is applied
once per query (not once per key), and the head sums come out spread over each head's slots (no
broadcast product). Public factors are folded as before: the norm weights into the next projection,
`1/sqrt(head_dim)` and the score scale `1/C` into `W_q`, grouped KV heads into `W_k`, `W_v`. RoPE
of the (public) position is its own product (a level: two rotations by half a head and three
slot-wise plaintexts), so the projections' diagonals are encoded once, not again at each position.

The KV cache is packed (`CircuitPlan.kv_copies`, `kv_copies_for`): a vector of the attention's
width `w` is laid out as `c` copies (`slots // w` where every product's size divides the slots;
else as many as end before the projections read past the cut copy, their input refreshed first),
so `c` cached positions share one ciphertext, position `t` in copy `t mod c`. The key and the
value come from one product whose copies take turns (the key in the even copies, the value in the
odd: one product's diagonals, where two would take twice as many), and one rotation moves the one
of them that is not in the position's copy there; RoPE's output is masked to that copy (free), the
value by a product off the critical path. One `q ⊙ k`, head sum and power then serve `c` keys at
once; the normaliser and the weighted values are summed over the copies by rotations (no level)
and, where the copies do not fill the slots exactly, the sum (right in copy 0) is masked and spread
back over every copy (one level).
"""

import contextlib
import math
from dataclasses import dataclass
from typing import Any

from .polynomial import Approximation
from .polynomial_form import approximated_ops, normaliser_floor, polynomial_enabled, score_scaled_attentions
from .symbolic import CircuitTally


@dataclass(frozen=True)
class NormSite:
    """A norm's inverse square root: `1/sqrt(mean(x²) + eps)` over groups of `size` values."""

    name: str
    approximation: Approximation
    eps: float
    size: int  # the values normalised together (hidden size, or head_dim for query/key norms)
    width: int  # the vector it normalises (hidden size, or heads · head_dim)
    centered: bool  # LayerNorm: subtract the mean first
    input_scale: float = 1.0  # what its input carries (the residual scale, `CircuitPlan.residual_scale`)
    balance: float = 1.0  # Newton's iteration runs on balance·x (`circuit_mapped`); the next product takes √balance

    @property
    def output_gain(self) -> float:
        """What the product reading the norm's output multiplies by (besides the norm weight)."""
        return math.sqrt(self.balance)

    def inverse_sqrt(self, t):
        """`1/sqrt(x)` of the mapped input, divided by `output_gain` when balanced."""
        if self.balance == 1.0:
            return self.approximation.circuit_mapped(t)
        return self.approximation.circuit_mapped(t, self.balance)

    @property
    def mean_factor(self) -> float:
        """What the summing matrix multiplies `Σ x²` by: the map's scale over the group size (and
        over the square of the input's scale: the inverse square root sees the unscaled mean,
        and the norm's output carries the input's scale on to the next product)."""
        return self.approximation.mapping[0] / (self.size * self.input_scale**2)

    @property
    def offset(self) -> float:
        scale, shift = self.approximation.mapping
        return scale * self.eps + shift


@dataclass(frozen=True)
class AttentionSite:
    """The attention normaliser's reciprocal `1/(gain·u)`, read from `t = map_scale·(gain·u) + shift`
    (`map_scale` 1: the map costs no product)."""

    name: str
    reciprocal: Approximation
    gain: float
    floor: float  # the normaliser's floor in the calibrated units (eps / C^p)
    score_scale: float

    @property
    def map_scale(self) -> float:
        return self.reciprocal.mapping[0]

    @property
    def offset(self) -> float:
        """What is added to the scaled powers' sum: the floor, and the map's shift when it is free."""
        return self.gain * self.floor + (self.reciprocal.mapping[1] if self.map_scale == 1.0 else 0.0)

    def reciprocal_of(self, normaliser):
        """`1/(gain·u)` from `normaliser = gain·u` (plus the shift when the map is folded)."""
        if self.map_scale == 1.0:
            return self.reciprocal.circuit_mapped(normaliser)
        return self.reciprocal.circuit_mapped(normaliser * self.map_scale + self.reciprocal.mapping[1])


@dataclass(frozen=True)
class BlockPlan:
    index: int
    input_norm: NormSite
    post_attention_norm: NormSite
    attention: AttentionSite
    activation: Approximation
    query_norm: NormSite | None = None
    key_norm: NormSite | None = None
    attention_output_norm: NormSite | None = None
    mlp_output_norm: NormSite | None = None


def _attention_site(name: str, op, attention, config, resolution: float | None) -> AttentionSite:
    approximation = op.approximation
    scale, shift = approximation.mapping
    low, high = approximation.domain
    balance = (low * high) ** -0.5  # keeps the powers and 1/(gain·u) both below sqrt(high/low)
    # Folding the map's scale into the powers saves its product, but puts the smallest normaliser
    # at scale·low (~2/ratio): where the ring cannot resolve that, balance and pay the product.
    fold = (scale, shift) != (1.0, 0.0) and (resolution is None or scale * low >= resolution)
    gain = scale if fold else balance
    reciprocal = approximation.rescaled(gain)  # folded: its map's scale is scale/scale, exactly 1
    floor = normaliser_floor(config, attention.score_scale)
    return AttentionSite(name, reciprocal, gain, floor, attention.score_scale)


@dataclass(frozen=True)
class CircuitPlan:
    """Everything the circuit needs from a model, snapshotted when it is built."""

    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    power: int
    mean_form: bool
    gated: bool
    parallel_residual: bool
    blocks: tuple[BlockPlan, ...]
    final_norm: NormSite
    residual_scale: float = 1.0
    kv_copies: int = 1  # cached positions per KV ciphertext (1: one ciphertext per position)
    slots: int | None = None  # the ring's slots (None: no ring, nothing packed)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def copies_fill_slots(self) -> bool:
        """Whether the packed copies fill the slots exactly: their rotation sum is then right in every
        copy, with no spread."""
        return self.slots is not None and self.kv_copies * self.width == self.slots

    @property
    def fuses_key_value(self) -> bool:
        """Whether the key and the value come from one product (packed, with no key norm between the
        projection and RoPE): the key in the even copies, the value in the odd ones, and each
        position's pair moved into its copy by one rotation (`DecoderCircuit.attention`)."""
        return self.kv_copies > 1 and not any(block.key_norm is not None for block in self.blocks)

    @property
    def replicates_projection_input(self) -> bool:
        """Whether the circuit refreshes the query/key/value projections' input before them: packed
        where some product's size does not divide the slots (see `kv_copies_for`)."""
        return self.kv_copies > 1 and bool(undivided(self.slots, (self.width, self.hidden_size, self.intermediate_size)))

    @classmethod
    def from_model(cls, model, normaliser_resolution: float | None = None, value_limit: float | None = None,
                   slots: int | None = None, kv_copies: int | None = None) -> "CircuitPlan":
        """The plan of a PolyAttn model (or its base model) in polynomial form.

        `normaliser_resolution`: the smallest attention normaliser the ring resolves (the CKKS
        server passes its precision over `PRECISION_LIMIT`); below it the reciprocal's input is
        balanced instead of folded, at one level.
        `value_limit`: the largest value the ring carries (a CKKS server's refresh bound). Where a
        norm's squares could pass it (real LLMs have a few residual values in the hundreds, so
        `x²` reaches ~1e5), the residual stream runs scaled by a power of two
        (`residual_scale`, see `residual_scale_for`).
        `slots`: the ring's slot count; the KV cache then packs `kv_copies` positions per ciphertext
        (default: as many copies of the attention's width as the slots hold; 1: no packing).
        """
        config = model.config
        base = getattr(model, "base_model", model)
        ops = approximated_ops(base)
        if not polynomial_enabled(config) or not ops or any(op.approximation is None for op in ops.values()):
            raise ValueError("the model is not in polynomial form; call to_polynomial() first")
        attentions = score_scaled_attentions(base)
        hidden, width = config.hidden_size, config.num_attention_heads * base.layers[0].self_attn.head_dim
        head_dim = base.layers[0].self_attn.head_dim
        copies = kv_copies_for(width, slots, kv_copies, reads=(hidden, config.intermediate_size),
                               projection_reach=hidden - 1 + head_dim // 2, qk_norm=bool(config.qk_norm))

        residual_norms = [f"layers.{i}.{n}" for i in range(config.num_hidden_layers)
                          for n in ("input_layernorm", "post_attention_layernorm")] + ["norm"]
        residual_scale = residual_scale_for(
            [(ops[f"{name}.inv_sqrt"].approximation, hidden) for name in residual_norms], value_limit
        )
        if residual_scale != 1.0 and (config.sandwich_norms or config.parallel_residual):
            raise NotImplementedError("a scaled residual stream is planned for the sequential Llama layout only")

        def norm(name: str, size: int, full: int) -> NormSite:
            module = base.get_submodule(name)
            approximation = ops[f"{name}.inv_sqrt"].approximation
            # a residual norm's Newton step sees mean(x²) unscaled (SmolLM2's reaches 1e6): balanced,
            # its √c folded into the next product (a residual norm's consumers are the server's products)
            balance = approximation.balance_for(value_limit) if name in residual_norms and hasattr(approximation, "balance_for") else 1.0
            return NormSite(
                name, approximation, float(module.variance_epsilon), size, full,
                centered=config.norm_type == "layer", input_scale=residual_scale if name in residual_norms else 1.0,
                balance=balance,
            )

        blocks = []
        for index in range(config.num_hidden_layers):
            prefix = f"layers.{index}."
            attention = attentions[prefix + "self_attn"]
            optional = {}
            if config.qk_norm:
                optional["query_norm"] = norm(prefix + "self_attn.q_norm", head_dim, width)
                optional["key_norm"] = norm(prefix + "self_attn.k_norm", head_dim, width)
            if config.sandwich_norms:
                optional["attention_output_norm"] = norm(prefix + "attn_output_norm", hidden, hidden)
                optional["mlp_output_norm"] = norm(prefix + "mlp_output_norm", hidden, hidden)
            blocks.append(
                BlockPlan(
                    index,
                    norm(prefix + "input_layernorm", hidden, hidden),
                    norm(prefix + "post_attention_layernorm", hidden, hidden),
                    _attention_site(
                        prefix + "self_attn", ops[prefix + "self_attn.reciprocal"], attention, config, normaliser_resolution
                    ),
                    ops[prefix + "mlp.act_fn"].approximation,
                    **optional,
                )
            )
        return cls(
            hidden_size=hidden,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            power=config.attn_power,
            mean_form=config.attn_form == "mean",
            gated=config.mlp_type == "gated",
            parallel_residual=bool(config.parallel_residual),
            blocks=tuple(blocks),
            final_norm=norm("norm", hidden, hidden),
            residual_scale=residual_scale,
            kv_copies=copies,
            slots=slots,
        )


def undivided(slots: int, sizes: tuple[int, ...]) -> list[int]:
    """The sizes that do not divide the slots: a vector of such a size ends in a cut copy."""
    return [n for n in sizes if slots % n]


def kv_copies_for(width: int, slots: int | None, requested: int | None = None, reads: tuple[int, ...] = (),
                  projection_reach: int | None = None, qk_norm: bool = False) -> int:
    """Cached positions per KV ciphertext: `requested`, or as many copies of `width` as fit.

    Packing reads every copy. Where every size (`width` and `reads`, the sizes the circuit's
    products read) divides the slots, every product is right in every slot: `slots // width`
    copies. Elsewhere (SmolLM2's 576 and 1536 on 4096 slots) a product's output slot `j` reads its
    input at slots `j … j + rows - 1`, wrong past the input's cut copy, and how far that reaches
    depends on the products since the last refresh. So the circuit refreshes the projections'
    input first (`CircuitPlan.replicates_projection_input`: every slot right again); a query or
    key slot `j` then reads that input up to `j + projection_reach` (the projection's rows - 1,
    and RoPE's half a head), so it is right up to slot `slots - 1 - projection_reach`, and the
    copies end there: `(slots - projection_reach) // width` of them. Query/key norms put a norm
    between the projection and RoPE, not planned for: such a model is not packed.
    """
    if slots is None:
        if requested not in (None, 1):
            raise ValueError("packing the KV cache needs the ring's slot count")
        return 1
    cut = undivided(slots, (width, *reads))
    if not cut:
        fit, why = slots // width, f"{slots} slots hold {slots // width} copies of width {width}"
    elif qk_norm or projection_reach is None:
        fit, why = 1, f"{cut} do not divide the {slots} slots, and query/key norms are not planned for with packing"
    else:
        fit = max(1, (slots - projection_reach) // width)
        why = (f"{cut} do not divide the {slots} slots: the copies of width {width} must end before slot "
               f"{slots - projection_reach}, where the query and key start reading past the cut copy")
    if requested is None:
        return fit
    if not 1 <= requested <= fit:
        raise ValueError(f"kv_copies must be in [1, {fit}] ({why}), got {requested}")
    return requested


def residual_scale_for(norms: list[tuple[Approximation, int]], value_limit: float | None) -> float:
    """The largest power of two `s ≤ 1` keeping every square `(s·x)²` a residual norm forms within
    `value_limit`: one value can hold the whole mean, `x² ≤ size · top of the domain of mean(x²)`.
    RMSNorm is scale-invariant, so the scale costs one product per token (the embedding's) and is
    folded everywhere else: into the products writing the residual (`s`), those reading a norm's
    output (`1/s`), and the mean of squares (`1/s²`)."""
    if value_limit is None:
        return 1.0
    largest = max(size * approximation.domain[1] for approximation, size in norms)
    if largest <= value_limit:
        return 1.0
    return 2.0 ** math.floor(0.5 * math.log2(value_limit / largest))


@dataclass(frozen=True)
class MatrixShape:
    """A plaintext matrix known by its shape only (what a symbolic run needs); `block`: a
    block-diagonal matrix of ones, summed by rotations (a CKKS backend's `BlockSumMatrix`);
    `kind`: a slot-wise product, of the packed KV cache ("copy_mask", "copy_spread") or RoPE
    ("rotary", with `block` the head it rotates)."""

    rows: int
    cols: int
    block: int | None = None
    kind: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def cost_key(self) -> tuple:
        """What prices the product: its shape, and the block of a rotation product or its kind."""
        if self.kind is not None:
            return (*self.shape, self.kind) if self.block is None else (*self.shape, self.kind, self.block)
        return self.shape if self.block is None else (*self.shape, self.block)


class ShapeMatrices:
    """The circuit's plaintext matrices as shapes: what `DecoderCircuit` multiplies by, symbolically."""

    def __init__(self, plan: CircuitPlan):
        self.plan = plan

    def matrix(self, name: str, block: int | None = None, position: int | None = None, site: NormSite | None = None):
        p = self.plan
        d, w, inner = p.hidden_size, p.width, p.intermediate_size
        shapes = {
            "query": (d, w), "key": (d, w), "value": (d, w), "key_value": (d, w), "score_sum": (w, w), "out": (w, d),
            "gate": (d, inner), "up": (d, inner), "down": (inner, d),
            "head": (d, p.vocab_size),
        }
        if name == "norm_sum":  # the mean of squares over each group of `size`, in its every slot
            return MatrixShape(site.width, site.width, site.size)
        if name == "norm_center":
            return MatrixShape(site.width, site.width)
        if name == "score_sum":  # each head's q ⊙ k summed and spread over the head
            return MatrixShape(w, w, p.head_dim)
        if name in ("copy_mask", "copy_spread"):  # the packed KV cache's slot-wise products
            return MatrixShape(w, w, kind=name)
        if name in ("query_rope", "key_rope"):  # by rotations of half a head and slot-wise products
            return MatrixShape(w, w, p.head_dim, kind="rotary")
        return MatrixShape(*shapes[name])


class _NoProfiler:
    def step(self, name: str):
        return contextlib.nullcontext()

    scope = step


def _power(x, power: int):
    """`x^power` by repeated squaring: depth ceil(log2 p)."""
    result, base, exponent = None, x, power
    while exponent:
        if exponent & 1:
            result = base if result is None else result * base
        exponent >>= 1
        if exponent:
            base = base * base
    return result


def _total(terms):
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


class DecoderCircuit:
    """One token's step through the model, with the keys and values of the tokens before it.

    Args:
        plan: `CircuitPlan.from_model(model)`.
        matrices: has `matrix(name, block=, position=, site=)` returning what `x.matmul` takes
            (`ShapeMatrices` for a symbolic run; the server's encoded matrices).
        profiler: `step(name)` / `scope(name)` context managers (the server's `LatencyProfiler`).
        lm_head: end with the LM head (logits) or with the final norm before its weight.
    """

    def __init__(self, plan: CircuitPlan, matrices, profiler=None, lm_head: bool = True):
        self.plan = plan
        self.matrices = matrices
        self.profiler = profiler or _NoProfiler()
        self.lm_head = lm_head
        self.reset()

    def reset(self) -> None:
        """Start a new sequence: drop the cached keys and values."""
        # per block: ciphertexts of `plan.kv_copies` positions each (the last one filling up)
        self.keys: list[list[Any]] = [[] for _ in self.plan.blocks]
        self.values: list[list[Any]] = [[] for _ in self.plan.blocks]
        self.cached: list[int] = [0 for _ in self.plan.blocks]  # positions in each block's cache

    @property
    def position(self) -> int:
        """Tokens of the current sequence already through every block."""
        return self.cached[-1]

    def _cache(self, index: int, key, value) -> None:
        """Append a position's key and value: a new ciphertext in copy 0, else added into the last."""
        if self.cached[index] % self.plan.kv_copies == 0:
            self.keys[index].append(key)
            self.values[index].append(value)
        else:
            self.keys[index][-1] = self.keys[index][-1] + key
            self.values[index][-1] = self.values[index][-1] + value
        self.cached[index] += 1

    def _key_value(self, both, position: int):
        """The key and the value of `position` from the fused product (key in the even copies, value
        in the odd), one of them moved by a copy into the position's own copy `c`, from a copy the
        projections get right: the value from copy 1 into copy 0, else from `c - 1` into `c`."""
        copy, width = position % self.plan.kv_copies, self.plan.width
        with self.profiler.step("kv packing"):
            if copy % 2:
                return both.rotate(-width), both
            return both, both.rotate(width if copy == 0 else -width)

    def _sum_copies(self, x):
        """The sum of a packed vector's copies, in every copy: rotations, then (when the copies do
        not fill the slots, so only copy 0 holds the whole sum) that copy masked and spread."""
        p = self.plan
        x = x.rotate_sum(p.width, p.kv_copies)
        return x if p.copies_fill_slots else x.matmul(self._matrix("copy_spread"))

    def _matrix(self, name: str, block: int | None = None, position: int | None = None, site=None):
        return self.matrices.matrix(name, block=block, position=position, site=site)

    def norm(self, x, site: NormSite, scaled=None):
        """`x / sqrt(mean(x²) + eps)` (groups of `site.size`); `scaled`: `x` times the norm's weight,
        when the weight cannot be folded into a following product (sandwich norms)."""
        with self.profiler.step("norm"):
            if site.centered:
                x = x.matmul(self._matrix("norm_center", site=site))
            t = (x * x).matmul(self._matrix("norm_sum", site=site)) + site.offset
            inverse = site.inverse_sqrt(t)
            return (x if scaled is None else scaled) * inverse

    def attention(self, block: BlockPlan, y):
        # This token's position: the keys this block cached before it (an earlier block of the
        # same step has already appended the token to its own cache).
        p, index = self.plan, block.index
        position = self.cached[index]
        packed = p.kv_copies > 1
        if p.replicates_projection_input:  # the copies reach slots only a replicated input gets right
            with self.profiler.step("kv packing"):
                y = y.replicated()
        with self.profiler.step("pt×ct matmul"):
            query = y.matmul(self._matrix("query", index))
            if p.fuses_key_value:
                both = y.matmul(self._matrix("key_value", index))
            else:
                key, value = y.matmul(self._matrix("key", index)), y.matmul(self._matrix("value", index))
        if p.fuses_key_value:
            key, value = self._key_value(both, position)
        if block.query_norm is not None:  # normalised per head before RoPE (Gemma 3, Qwen 3)
            query, key = self.norm(query, block.query_norm), self.norm(key, block.key_norm)
        with self.profiler.step("rope"):  # the position's own: packed, the key's writes its copy only
            query = query.matmul(self._matrix("query_rope", index, position))
            key = key.matmul(self._matrix("key_rope", index, position))
        if packed:  # the value into its copy: a level, while the scores take four
            with self.profiler.step("kv packing"):
                value = value.matmul(self._matrix("copy_mask", index, position))
        self._cache(index, key, value)
        score_sum = self._matrix("score_sum", index, position)
        with self.profiler.step("ct×ct matmul"):
            scores = [(query * cached).matmul(score_sum) for cached in self.keys[index]]
        with self.profiler.step("power-softmax"):
            powers = [_power(score, p.power) for score in scores]
            normaliser = _total(powers)
        with self.profiler.step("ct×ct matmul"):
            weighted = _total([term * cached for term, cached in zip(powers, self.values[index])])
        if packed:
            with self.profiler.step("kv packing"):
                normaliser, weighted = self._sum_copies(normaliser), self._sum_copies(weighted)
        normaliser = normaliser + block.attention.offset
        with self.profiler.step("reciprocal"):
            inverse = block.attention.reciprocal_of(normaliser)
        with self.profiler.step("ct×ct matmul"):
            out = weighted * inverse
        with self.profiler.step("pt×ct matmul"):
            return out.matmul(self._matrix("out", index))

    def mlp(self, block: BlockPlan, y):
        index, activation = block.index, block.activation
        with self.profiler.step("pt×ct matmul"):
            pre = y.matmul(self._matrix("gate" if self.plan.gated else "up", index)) + activation.mapping[1]
            up = y.matmul(self._matrix("up", index)) if self.plan.gated else None
        with self.profiler.step("activation"):
            activated = activation.circuit_mapped(pre)
        with self.profiler.step("pt×ct matmul"):
            return (activated if up is None else activated * up).matmul(self._matrix("down", index))

    def _branch_output(self, out, site: NormSite | None):
        return out if site is None else self.norm(out, site)

    def block(self, block: BlockPlan, hidden):
        """One decoder block on the token's residual stream."""
        with self.profiler.scope(f"layer {block.index}"):
            attended = self._branch_output(self.attention(block, self.norm(hidden, block.input_norm)), block.attention_output_norm)
            if self.plan.parallel_residual:
                mlp_input = hidden
                hidden = hidden + attended
            else:
                hidden = hidden + attended
                mlp_input = hidden
            return hidden + self._branch_output(self.mlp(block, self.norm(mlp_input, block.post_attention_norm)), block.mlp_output_norm)

    def head(self, hidden):
        with self.profiler.scope("head"):
            out = self.norm(hidden, self.plan.final_norm)
            if self.lm_head:
                with self.profiler.step("pt×ct matmul"):
                    out = out.matmul(self._matrix("head"))
            elif self.plan.final_norm.output_gain != self.plan.residual_scale:  # the client reads the normalised state
                out = out * (self.plan.final_norm.output_gain / self.plan.residual_scale)
            return out

    def step(self, hidden):
        """One token: its hidden state (after the embedding) in, logits (or the final norm) out.
        A step that fails midway (a refused refresh, a lost client) leaves the KV cache as it was
        before it, so the sequence can go on from the same position."""
        before = ([list(keys) for keys in self.keys], [list(values) for values in self.values], list(self.cached))
        if self.plan.residual_scale != 1.0:
            hidden = hidden * self.plan.residual_scale
        try:
            for block in self.plan.blocks:
                hidden = self.block(block, hidden)
            return self.head(hidden)
        except BaseException:
            self.keys, self.values, self.cached = before
            raise


def symbolic_run(plan: CircuitPlan, num_tokens: int, top_level: int | None = None, refresh_allowed: bool = True,
                 matrices=None, lm_head: bool = True) -> CircuitTally:
    """`num_tokens` steps of the circuit on symbolic ciphertexts: levels, products, refreshes."""
    tally = CircuitTally(top_level, refresh_allowed)
    circuit = DecoderCircuit(plan, matrices or ShapeMatrices(plan), lm_head=lm_head)
    for _ in range(num_tokens):
        circuit.step(tally.fresh(plan.hidden_size))
    return tally


def circuit_depths(plan: CircuitPlan, lm_head: bool = True) -> dict[str, Any]:
    """Per block and in all, the levels the first token's step uses, from a fresh input.

    `attention_depth` is the depth of the residual stream after the attention branch (of the
    attention branch itself with the parallel residual), `mlp_depth` that of the MLP branch with
    its norm, `depth` the whole block's; `total_depth` is the step's critical path.
    """
    blocks = []
    for block in plan.blocks:
        circuit = DecoderCircuit(plan, ShapeMatrices(plan))
        start = CircuitTally().fresh(plan.hidden_size)
        attention = circuit.attention(block, circuit.norm(start, block.input_norm))
        attention = circuit._branch_output(attention, block.attention_output_norm)
        mlp = circuit._branch_output(circuit.mlp(block, circuit.norm(start, block.post_attention_norm)), block.mlp_output_norm)
        circuit.reset()
        whole = circuit.block(block, start)
        blocks.append({"block": block.index, "attention_depth": attention.depth, "mlp_depth": mlp.depth, "depth": whole.depth})
    head = DecoderCircuit(plan, ShapeMatrices(plan), lm_head=lm_head).head(CircuitTally().fresh(plan.hidden_size)).depth
    total = DecoderCircuit(plan, ShapeMatrices(plan), lm_head=lm_head).step(CircuitTally().fresh(plan.hidden_size)).depth
    return {"blocks": blocks, "head_depth": head, "total_depth": total}


__all__ = [
    "AttentionSite",
    "BlockPlan",
    "CircuitPlan",
    "DecoderCircuit",
    "MatrixShape",
    "NormSite",
    "ShapeMatrices",
    "circuit_depths",
    "kv_copies_for",
    "residual_scale_for",
    "symbolic_run",
]
