"""Gemma and Gemma 3: Llama's layout plus `(1 + w)` norms, scaled embeddings and (Gemma 3) sandwich
norms, query/key norms and a RoPE base per layer type.

Gemma 3's sliding-window layers become full-context layers: identical on sequences up to
`sliding_window` tokens (512 for Gemma 3 270M), and Power-Softmax attention is the part that is
trained anyway after conversion.
"""

from typing import Any

from .base import Family, StateDict, inverse, rename

_GEMMA3_RENAMES = [  # Gemma 3 name → PolyAttn name (tried in this order, once each)
    (".post_attention_layernorm.", ".attn_output_norm."),
    (".pre_feedforward_layernorm.", ".post_attention_layernorm."),
    (".post_feedforward_layernorm.", ".mlp_output_norm."),
]
_NORM_SUFFIX = "norm.weight"  # every Gemma norm: *_layernorm, q_norm, k_norm, model.norm


def _check(config) -> None:
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            raise ValueError(f"cannot convert a {config.model_type} checkpoint with {name}={getattr(config, name)}")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("cannot convert a Gemma checkpoint with bidirectional attention: PolyAttn is causal")


def _rope(config) -> dict[str, Any]:
    rope = dict(config.rope_parameters or {})
    if config.model_type != "gemma3_text":
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"cannot convert rope_type {rope['rope_type']!r}: only 'default' RoPE")
        return {"rope_parameters": rope}
    per_type = {layer_type: rope[layer_type] for layer_type in set(config.layer_types)}
    for layer_type, parameters in per_type.items():
        if parameters.get("rope_type", "default") != "default":
            raise ValueError(f"cannot convert {layer_type} rope_type {parameters['rope_type']!r}: only 'default' RoPE")
    reference = per_type.get("full_attention") or next(iter(per_type.values()))
    return {
        "rope_parameters": {"rope_type": "default", "rope_theta": reference["rope_theta"]},
        "layer_rope_theta": [per_type[layer_type]["rope_theta"] for layer_type in config.layer_types],
    }


def _layout(config) -> dict[str, Any]:
    gemma3 = config.model_type == "gemma3_text"
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": getattr(config, "hidden_activation", None) or config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "embedding_multiplier": config.hidden_size**0.5,
        "query_pre_attn_scalar": getattr(config, "query_pre_attn_scalar", None),
        "sandwich_norms": gemma3,
        "qk_norm": gemma3,
        **_rope(config),
    }


def _shift_norms(state: StateDict, by: float) -> StateDict:
    # Gemma's norms multiply by (1 + w); PolyAttn's by w.
    return {name: t + by if name.endswith(_NORM_SUFFIX) else t for name, t in state.items()}


def _to_polyattn(state: StateDict, config) -> StateDict:
    state = _shift_norms(state, 1.0)
    return rename(state, _GEMMA3_RENAMES) if config.model_type == "gemma3_text" else state


def _from_polyattn(state: StateDict, config) -> StateDict:
    if config.model_type == "gemma3_text":
        state = rename(state, inverse(_GEMMA3_RENAMES))
    return _shift_norms(state, -1.0)


GEMMA = Family("Gemma", ("gemma", "gemma3_text"), _layout, _to_polyattn, _from_polyattn, _check)
