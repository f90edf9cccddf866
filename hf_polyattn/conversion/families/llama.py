"""Llama, SmolLM2, Mistral and Qwen2: already PolyAttn's layout (Qwen2 adds q/k/v biases)."""

from typing import Any

import torch

from .base import Family, StateDict, rope_fields

# Llama-config fields PolyAttn shares, copied as they are.
_SHARED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def _layout(config) -> dict[str, Any]:
    source = config.to_dict()
    fields = {name: source[name] for name in _SHARED if source.get(name) is not None}
    return {**fields, **rope_fields(config)}


def _check(config) -> None:
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ValueError(
            f"cannot convert a {config.model_type} checkpoint with sliding_window={config.sliding_window}: "
            "PolyAttn attends over the full causal context"
        )


def _identity(state: StateDict, config) -> StateDict:
    return dict(state)


LLAMA = Family("Llama", ("llama", "mistral"), _layout, _identity, _identity, _check)


def _qwen2_layout(config) -> dict[str, Any]:
    # q/k/v carry biases and o_proj does not; PolyAttn's attention_bias covers all four, so
    # o_proj gets an exactly-zero bias (removed again on the way back).
    return {**_layout(config), "attention_bias": True}


def _qwen2_to_polyattn(state: StateDict, config) -> StateDict:
    state = dict(state)
    for name in [n for n in state if n.endswith("self_attn.o_proj.weight")]:
        weight = state[name]
        state[name.replace(".weight", ".bias")] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return state


def _qwen2_from_polyattn(state: StateDict, config) -> StateDict:
    state = dict(state)
    for name in [n for n in state if n.endswith("self_attn.o_proj.bias")]:
        bias = state.pop(name)
        if bias.count_nonzero():
            raise ValueError(f"{name} was trained away from zero: Qwen2 has no o_proj bias to hold it")
    return state


QWEN2 = Family("Qwen2", ("qwen2",), _qwen2_layout, _qwen2_to_polyattn, _qwen2_from_polyattn, _check)
