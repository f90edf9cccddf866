"""Configuration of PolyAttn models: a Llama-shaped decoder whose attention is Power-Softmax."""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig

ATTN_FORMS = ("sum", "mean")
NORM_TYPES = ("rms", "layer")
MLP_TYPES = ("gated", "plain")
POSITION_EMBEDDING_TYPES = ("rope", "learned")

# Where `trust_remote_code=True` finds each class in a saved folder: the flattened module names
# that `save_pretrained` copies next to the weights (modeling_polyattn.py and its same-folder
# imports). Every PolyAttn save writes all three, whichever class is saved.
AUTO_MAP = {
    "AutoConfig": "configuration_polyattn.PolyAttnConfig",
    "AutoModel": "modeling_polyattn.PolyAttnModel",
    "AutoModelForCausalLM": "modeling_polyattn.PolyAttnForCausalLM",
}


@strict
class PolyAttnConfig(LlamaConfig):
    r"""Configuration of a [`PolyAttnForCausalLM`].

    It has every field of [`~transformers.LlamaConfig`] (so a Llama checkpoint converts by a
    plain weight copy), the Power-Softmax attention fields, and the layout fields that let
    GPT-NeoX and GPT-2 checkpoints convert too (their defaults are Llama's layout):

    Args:
        attn_power (`int`, defaults to 4):
            The even power `p` in `x_j^p / (eps + Σ_i x_i^p)`. 4–8 train well; 2 is too flat.
        attn_eps (`float`, defaults to 1e-6):
            The floor `eps` added to the normaliser. It bounds the domain of the reciprocal that
            the polynomial form approximates; 0 gives the exact, scale-invariant ratio.
        attn_form (`str`, defaults to `"sum"`):
            `"sum"`: `x_j^p / (eps + Σ_{i≤L} x_i^p)`. `"mean"`: the length-agnostic
            `x_j^p / (L · (eps + Mean_{i≤L} x_i^p))`, whose normaliser stays bounded as the
            sequence grows; `1/L` is a public constant. With `eps = 0` both are the same function;
            a row sums to `S / (eps + S)` with `S` the sum, respectively the mean.
        attn_stable_scaling (`bool`, defaults to `True`):
            Compute with scores divided by `c = max|score| + attn_scale_delta` (and `eps / c^p`),
            which is algebraically the same function but keeps `x^p` from overflowing in
            bf16/fp16 training. The polynomial form turns it off (max is not polynomial).
        attn_scale_delta (`float`, defaults to 1e-4):
            The `δ` of the stable scaling; keeps `c > 0` on all-zero rows.
        norm_type (`str`, defaults to `"rms"`):
            `"rms"`: Llama's RMSNorm. `"layer"`: LayerNorm with a bias (GPT-NeoX, GPT-2); both use
            `rms_norm_eps` as their epsilon.
        mlp_type (`str`, defaults to `"gated"`):
            `"gated"`: `down(act(gate(x)) * up(x))` (Llama). `"plain"`: `down(act(up(x)))` (GPT-NeoX,
            GPT-2); `mlp_bias` gives both projections a bias.
        parallel_residual (`bool`, defaults to `False`):
            `True`: `h + attn(norm1(h)) + mlp(norm2(h))` (GPT-NeoX); `False`: the sequential block.
        position_embedding_type (`str`, defaults to `"rope"`):
            `"rope"`: rotary embeddings (`rope_parameters["partial_rotary_factor"]` rotates only the
            first part of each head, as GPT-NeoX does). `"learned"`: a learned absolute position
            table of `max_position_embeddings` rows added to the token embeddings (GPT-2).
        sandwich_norms (`bool`, defaults to `False`):
            Also normalise the attention output and the MLP output before each residual add
            (`attn_output_norm`, `mlp_output_norm`; Gemma 2/3).
        qk_norm (`bool`, defaults to `False`):
            RMSNorm over the head dimension of every query and key, before RoPE (`q_norm`, `k_norm`;
            Gemma 3, Qwen3).
        query_pre_attn_scalar (`float`, *optional*):
            Scores are scaled by `query_pre_attn_scalar ** -0.5`; `None`: by `head_dim ** -0.5`.
        embedding_multiplier (`float`, defaults to 1.0):
            Token embeddings are multiplied by it (Gemma: `sqrt(hidden_size)`).
        layer_rope_theta (`list[float]`, *optional*):
            A RoPE base per layer (Gemma 3's local and global layers); `None`: every layer uses
            `rope_parameters["rope_theta"]`.
        polynomial (`dict`, *optional*):
            The plain-data description of the polynomial approximations (filled by
            `to_polynomial()`); `None` means the exact model.
    """

    model_type = "polyattn"
    _auto_class = "AutoConfig"  # saving ships configuration_polyattn.py (see AUTO_MAP)

    attn_power: int = 4
    attn_eps: float = 1e-6
    attn_form: str = "sum"
    attn_stable_scaling: bool = True
    attn_scale_delta: float = 1e-4
    norm_type: str = "rms"
    mlp_type: str = "gated"
    parallel_residual: bool = False
    position_embedding_type: str = "rope"
    sandwich_norms: bool = False
    qk_norm: bool = False
    query_pre_attn_scalar: int | float | None = None
    embedding_multiplier: int | float = 1.0
    layer_rope_theta: list[int | float] | None = None
    polynomial: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        self._check_fields()
        super().__post_init__(**kwargs)

    def _check_fields(self) -> None:
        # Plain ValueErrors naming the field: strict's own errors do not subclass ValueError.
        if isinstance(self.attn_power, bool) or not isinstance(self.attn_power, int):
            raise ValueError(f"attn_power must be an even integer >= 2, got {self.attn_power!r}")
        if self.attn_power < 2 or self.attn_power % 2:
            raise ValueError(
                f"attn_power must be an even integer >= 2 (an odd power is not positive), got {self.attn_power}"
            )
        if not self.attn_eps >= 0:
            raise ValueError(f"attn_eps must be >= 0, got {self.attn_eps}")
        if not self.attn_scale_delta > 0:
            raise ValueError(f"attn_scale_delta must be > 0, got {self.attn_scale_delta}")
        if self.attn_form not in ATTN_FORMS:
            raise ValueError(f"attn_form must be one of {ATTN_FORMS}, got {self.attn_form!r}")
        for name, allowed in (
            ("norm_type", NORM_TYPES),
            ("mlp_type", MLP_TYPES),
            ("position_embedding_type", POSITION_EMBEDDING_TYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_hidden_layers < 0:  # 0: a client's copy (embedding, final norm, LM head; ckks.client_model)
            raise ValueError(f"num_hidden_layers must be >= 0, got {self.num_hidden_layers}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})"
            )
        kv_heads = self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads
        if kv_heads <= 0 or self.num_attention_heads % kv_heads:
            raise ValueError(
                f"num_key_value_heads ({kv_heads}) must be positive and divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.layer_rope_theta is not None and len(self.layer_rope_theta) != self.num_hidden_layers:
            raise ValueError(
                f"layer_rope_theta has {len(self.layer_rope_theta)} entries for {self.num_hidden_layers} layers"
            )
        if self.query_pre_attn_scalar is not None and not self.query_pre_attn_scalar > 0:
            raise ValueError(f"query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")


__all__ = ["PolyAttnConfig"]
