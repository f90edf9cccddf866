"""GPT-NeoX (Pythia): LayerNorm, plain GELU MLP, parallel residual, partial rotary, fused QKV."""

import re
from typing import Any

import torch

from .base import Family, StateDict, inverse, rename, rope_fields

_RENAMES = [
    ("gpt_neox.embed_in.", "model.embed_tokens."),
    ("gpt_neox.final_layer_norm.", "model.norm."),
    ("gpt_neox.layers.", "model.layers."),
    (".attention.dense.", ".self_attn.o_proj."),
    (".mlp.dense_h_to_4h.", ".mlp.up_proj."),
    (".mlp.dense_4h_to_h.", ".mlp.down_proj."),
]
_FUSED = re.compile(r"(.*)\.attention\.query_key_value\.(weight|bias)$")
_SPLIT = re.compile(r"(.*)\.self_attn\.q_proj\.(weight|bias)$")


def _layout(config) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.layer_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "norm_type": "layer",
        "mlp_type": "plain",
        "parallel_residual": config.use_parallel_residual,
        **rope_fields(config),
    }


def _to_polyattn(state: StateDict, config) -> StateDict:
    heads = config.num_attention_heads
    out = {}
    for name, tensor in state.items():
        if name.endswith((".attention.bias", ".attention.masked_bias")):  # old causal-mask buffers
            continue
        fused = _FUSED.match(name)
        if fused:
            # The fused rows are per head: [q_h, k_h, v_h] for h = 0..H-1.
            prefix, kind = fused.groups()
            per_head = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
            for index, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{prefix}.self_attn.{projection}.{kind}"] = per_head[:, index].reshape(-1, *tensor.shape[1:])
            continue
        out[name] = tensor
    return rename(out, _RENAMES)


def _from_polyattn(state: StateDict, config) -> StateDict:
    heads = config.num_attention_heads
    state = rename(state, inverse(_RENAMES))
    out = {}
    for name, tensor in state.items():
        split = _SPLIT.match(name)
        if split:
            prefix, kind = split.groups()
            parts = [state[f"{prefix}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            per_head = torch.stack([p.reshape(heads, -1, *tensor.shape[1:]) for p in parts], dim=1)
            out[f"{prefix}.attention.query_key_value.{kind}"] = per_head.reshape(-1, *tensor.shape[1:])
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            out[name] = tensor
    return out


GPT_NEOX = Family("GPT-NeoX", ("gpt_neox",), _layout, _to_polyattn, _from_polyattn)
