"""PolyAttn: a Llama-shaped causal LM whose attention is Power-Softmax.

The parameter layout is Llama's (`q/k/v/o_proj`, `gate/up/down_proj`, `input_layernorm`,
`post_attention_layernorm`, `norm`), so a Llama-family checkpoint converts by a plain copy. The
config's layout fields add what GPT-NeoX, GPT-2 and Gemma need (LayerNorm, a plain MLP, the
parallel residual, partial rotary or learned positions, sandwich and query/key norms, a RoPE base
per layer) under the same parameter names. The rotary
embedding and its application are transformers' own (GPT-NeoX's, which is Llama's when the whole
head rotates).
"""

import copy

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_polyattn import AUTO_MAP, PolyAttnConfig
from .calibration import record_ranges
from .polynomial_form import (
    DEFAULT_MARGIN,
    DEFAULT_TOLERANCE,
    ApproximatedOp,
    build_polynomial_spec,
    format_polynomial_report,
    install_polynomial,
    normaliser_floor,
    polynomial_enabled,
    polynomial_report,
    remove_polynomial,
)
from .power_softmax import ATTENTION_NAME, exact_reciprocal, power_softmax_attention_forward
from .secure_generation import SecureGenerationMixin


class PolyAttnRMSNorm(LlamaRMSNorm):
    """RMSNorm `γ · x / sqrt(mean(x²) + eps)`; the polynomial form replaces the inverse sqrt."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps)
        self.inv_sqrt = ApproximatedOp("inv_sqrt", torch.rsqrt, harmless_at=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon
        return self.weight * (hidden_states * self.inv_sqrt(variance)).to(input_dtype)


class PolyAttnLayerNorm(nn.Module):
    """LayerNorm `γ · (x − mean) / sqrt(var + eps) + β`; the polynomial form replaces the inverse sqrt.

    Centering is linear, so the only non-polynomial step is the same inverse sqrt as RMSNorm's.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps
        self.inv_sqrt = ApproximatedOp("inv_sqrt", torch.rsqrt, harmless_at=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        centered = hidden_states - hidden_states.mean(-1, keepdim=True)
        variance = centered.pow(2).mean(-1, keepdim=True) + self.variance_epsilon
        return (self.weight * (centered * self.inv_sqrt(variance)) + self.bias).to(input_dtype)


def polyattn_norm(config: PolyAttnConfig) -> nn.Module:
    """The norm the config's `norm_type` names."""
    norm = PolyAttnRMSNorm if config.norm_type == "rms" else PolyAttnLayerNorm
    return norm(config.hidden_size, eps=config.rms_norm_eps)


class PolyAttnMLP(nn.Module):
    """`down(act(gate(x)) * up(x))` (gated) or `down(act(up(x)))` (plain); the polynomial form
    replaces `act`."""

    def __init__(self, config: PolyAttnConfig):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias) if config.mlp_type == "gated" else None
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act_fn = ApproximatedOp("activation", ACT2FN[config.hidden_act])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PolyAttnRotaryEmbedding(GPTNeoXRotaryEmbedding):
    """RoPE over the first `partial_rotary_factor` of each head (all of it by default)."""


def _with_rope_theta(config: PolyAttnConfig, theta: float) -> PolyAttnConfig:
    """A shallow copy of `config` whose RoPE base is `theta` (for a layer's own rotary embedding)."""
    copied = copy.copy(config)
    copied.rope_parameters = {**(config.rope_parameters or {}), "rope_theta": theta}
    return copied


class PolyAttnAttention(LlamaAttention):
    """Llama's attention block; the score normalisation is dispatched to `"power_softmax"`.

    It carries the pieces the attention function picks up: `reciprocal` (the normaliser's 1/x,
    approximated in the polynomial form), `score_probe` (calibration watches the scores) and
    `score_scale` (`None`: the config's stable scaling; a number: the polynomial form's static
    scale).
    """

    def __init__(self, config: PolyAttnConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.reciprocal = ApproximatedOp("reciprocal", exact_reciprocal)
        self.score_probe = nn.Identity()
        self.score_scale: float | None = None
        if config.query_pre_attn_scalar is not None:
            self.scaling = config.query_pre_attn_scalar**-0.5
        self.q_norm = PolyAttnRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = PolyAttnRMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.qk_norm else None

    def set_score_scale(self, scale: float | None) -> None:
        """Divide the scores by the public constant `scale` (`None`: the config's stable scaling).

        The normaliser's floor moves with it (`eps / scale^p`): inputs at the floor (fully masked
        rows) are harmless and neither calibrated on nor warned about.
        """
        self.score_scale = scale
        self.reciprocal.harmless_at = None if scale is None else normaliser_floor(self.config, scale)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama's attention with partial rotary (GPT-NeoX's RoPE), no RoPE under learned positions,
        and the optional query/key norms."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, power_softmax_attention_forward
        )
        output, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class PolyAttnDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `h + attn(norm(h))`, then `h + mlp(norm(h))`; with `parallel_residual`,
    `h + attn(norm1(h)) + mlp(norm2(h))`; with `sandwich_norms`, each branch output normalised too."""

    def __init__(self, config: PolyAttnConfig, layer_idx: int):
        super().__init__()
        self.self_attn = PolyAttnAttention(config=config, layer_idx=layer_idx)
        self.mlp = PolyAttnMLP(config)
        self.input_layernorm = polyattn_norm(config)
        self.post_attention_layernorm = polyattn_norm(config)
        self.attn_output_norm = polyattn_norm(config) if config.sandwich_norms else nn.Identity()
        self.mlp_output_norm = polyattn_norm(config) if config.sandwich_norms else nn.Identity()
        self.parallel_residual = config.parallel_residual

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        attn_output = self.attn_output_norm(attn_output)
        if self.parallel_residual:
            mlp_output = self.mlp_output_norm(self.mlp(self.post_attention_layernorm(hidden_states)))
            return hidden_states + attn_output + mlp_output
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp_output_norm(self.mlp(self.post_attention_layernorm(hidden_states)))


class PolyAttnPreTrainedModel(PreTrainedModel):
    config_class = PolyAttnConfig
    config: PolyAttnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PolyAttnDecoderLayer"]
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": PolyAttnDecoderLayer,
        "attentions": PolyAttnAttention,
    }

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        # A PolyAttn model *is* its attention: sdpa/eager/flash would silently compute softmax.
        if requested_attention is None:
            return ATTENTION_NAME
        if not requested_attention.startswith(ATTENTION_NAME):
            raise ValueError(
                f"PolyAttn models only run Power-Softmax attention (attn_implementation="
                f"{ATTENTION_NAME!r} or a registered variant), got {requested_attention!r}"
            )
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained` (and so `push_to_hub`), always shipping the model code.

        The folder gets `modeling_polyattn.py` with its same-folder imports and the full
        `auto_map`, so it loads with `trust_remote_code=True` in a process that cannot import
        `hf_polyattn` (lm-evaluation-harness, plain scripts). transformers writes only the saved
        class's own Auto entry; the others are added here.
        """
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def post_init(self):
        super().post_init()
        if polynomial_enabled(self.config) and self is self.base_model:
            install_polynomial(self, self.config.polynomial)

    @property
    def is_polynomial(self) -> bool:
        """Whether the forward pass is the polynomial (+, × only) circuit."""
        return polynomial_enabled(self.config)

    def to_polynomial(
        self,
        calibration_data=None,
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        margin: float = DEFAULT_MARGIN,
        reciprocal: dict | None = None,
        inv_sqrt: dict | None = None,
        activation: dict | None = None,
        check_domain: bool = True,
        progress: bool = True,
    ):
        """Switch to the polynomial form: the forward pass uses only +, × and constants.

        Args:
            calibration_data: batches (LongTensors of ids, or dicts with `input_ids` and an
                optional `attention_mask`) run through the exact model to choose every domain.
                `None` keeps the domains already in `config.polynomial` or, on a first call, the
                documented defaults (`DEFAULT_DOMAINS`, score scale 8): it always runs, but only
                calibration makes it accurate.
            tolerance: the max relative error of the reciprocal and inverse square root, and the
                max absolute error of the activation, over their domains: it picks their degrees
                and iterations.
            margin: the norms' domains are `[min / margin, max · margin²]` of what was observed
                (held-out variances go past the calibrated top more than below its bottom), the
                attention normaliser's from its floor `eps / C^p` to `max · margin`; activations
                get a quarter of the observed width on each side.
            reciprocal / inv_sqrt / activation: options of each approximation, e.g.
                `reciprocal={"method": "newton", "init_degree": 7}`, `activation={"degree": 31}`,
                `inv_sqrt={"init_degree": 3, "iterations": 2}` (defaults: `DEFAULT_OPTIONS`; an
                initial guess's degree "auto" picks the shallowest circuit meeting `tolerance`).
            check_domain: count inputs outside a domain and warn once per step.
            progress: show a progress bar while calibrating.

        Returns the model itself; `to_exact()` switches back.
        """
        options = {k: v for k, v in (("reciprocal", reciprocal), ("inv_sqrt", inv_sqrt), ("activation", activation)) if v}
        base = self.base_model
        previous = self.config.polynomial
        if calibration_data is None and previous and not options:
            spec = {**previous, "enabled": True}
        else:
            ranges = record_ranges(self, calibration_data, progress) if calibration_data is not None else None
            if ranges is None and previous and previous.get("calibrated"):
                raise ValueError(
                    "to_polynomial() with new approximation options needs calibration_data: the calibrated "
                    "domains cannot be kept when the approximations change"
                )
            spec = build_polynomial_spec(base, self.config, ranges, tolerance, margin, options)
        install_polynomial(base, spec, check_domain)
        self.config.polynomial = spec
        return self

    def to_exact(self):
        """Back to the exact model; the polynomial description stays in the config (disabled)."""
        remove_polynomial(self.base_model)
        if self.config.polynomial:
            self.config.polynomial = {**self.config.polynomial, "enabled": False}
        return self

    def polynomial_report(self, as_text: bool = False, normaliser_resolution: float | None = None,
                          slots: int | None = None):
        """Per-step domains, depths, multiplication counts and errors, and the model's depth
        (measured on the server's circuit; `normaliser_resolution`, `slots`: see `polynomial_report`)."""
        report = polynomial_report(self.base_model, self.config, normaliser_resolution, slots)
        return format_polynomial_report(report) if as_text else report


class PolyAttnModel(PolyAttnPreTrainedModel):
    """The decoder stack: embeddings (+ learned positions) → PolyAttn blocks → final norm."""

    _auto_class = "AutoModel"  # save_pretrained copies this file and its siblings (AUTO_MAP)

    def __init__(self, config: PolyAttnConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [PolyAttnDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = polyattn_norm(config)
        learned = config.position_embedding_type == "learned"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        self.rotary_emb = None if learned else PolyAttnRotaryEmbedding(config=config)
        # Layers with their own RoPE base (Gemma 3): one rotary embedding per distinct base.
        thetas = sorted(set(config.layer_rope_theta or []))
        self.layer_rotary = nn.ModuleList(PolyAttnRotaryEmbedding(_with_rope_theta(config, t)) for t in thetas)
        self._layer_rotary_index = [thetas.index(t) for t in config.layer_rope_theta or []]
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the stack. `cache` is transformers 5's cache argument (there is no `past_key_values`)."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if self.config.embedding_multiplier != 1.0:
                inputs_embeds = inputs_embeds * torch.tensor(self.config.embedding_multiplier, dtype=inputs_embeds.dtype)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens)[None]

        keep_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = None
        if self.embed_positions is not None:
            if position_ids.max() >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {int(position_ids.max())} is beyond the learned position table "
                    f"(max_position_embeddings={self.config.max_position_embeddings})"
                )
            hidden_states = hidden_states + self.embed_positions(position_ids).to(hidden_states.dtype)
        elif not self.layer_rotary:
            position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        per_base = [rotary(hidden_states, position_ids=position_ids) for rotary in self.layer_rotary]
        for index, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=keep_mask,
                position_embeddings=per_base[self._layer_rotary_index[index]] if per_base else position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class PolyAttnForCausalLM(PolyAttnPreTrainedModel, SecureGenerationMixin, GenerationMixin):
    """PolyAttn with a language-modelling head; `generate()` works as for any transformers LM,
    and `generate(secure=True)` runs it over CKKS (see `secure_generation.py`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies this file and its siblings (AUTO_MAP)

    def __init__(self, config: PolyAttnConfig):
        super().__init__(config)
        self.model = PolyAttnModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (and the shifted LM loss when `labels` are given) for `input_ids`."""
        if self._secure_session is not None:  # inside generate(secure=True): the session computes
            return self._secure_forward(input_ids, inputs_embeds, cache)
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["PolyAttnForCausalLM", "PolyAttnModel", "PolyAttnPreTrainedModel"]
