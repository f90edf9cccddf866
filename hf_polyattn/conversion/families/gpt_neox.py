"""GPT-NeoX (Pythia): LayerNorm, plain GELU MLP, parallel residual, partial rotary, fused QKV."""

import re
from typing import Any

import torch

from .base import Family, StateDict, fuse_qkv, inverse, rename, rope_fields, split_fused_qkv

_RENAMES = [
    ("gpt_neox.embed_in.", "model.embed_tokens."),
    ("gpt_neox.final_layer_norm.", "model.norm."),
    ("gpt_neox.layers.", "model.layers."),
    (".attention.dense.", ".self_attn.o_proj."),
    (".mlp.dense_h_to_4h.", ".mlp.up_proj."),
    (".mlp.dense_4h_to_h.", ".mlp.down_proj."),
]
_FUSED = re.compile(r"(.*)\.attention\.query_key_value\.(weight|bias)$")


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

    def split(tensor: torch.Tensor, kind: str) -> tuple[torch.Tensor, ...]:
        # The fused rows are per head: [q_h, k_h, v_h] for h = 0..H-1.
        per_head = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
        return tuple(per_head[:, index].reshape(-1, *tensor.shape[1:]) for index in range(3))

    # old checkpoints carry causal-mask buffers: not weights
    state = {n: t for n, t in state.items() if not n.endswith((".attention.bias", ".attention.masked_bias"))}
    return rename(split_fused_qkv(state, _FUSED, split), _RENAMES)


def _from_polyattn(state: StateDict, config) -> StateDict:
    heads = config.num_attention_heads

    def fuse(parts: list[torch.Tensor], kind: str) -> torch.Tensor:
        per_head = torch.stack([p.reshape(heads, -1, *p.shape[1:]) for p in parts], dim=1)
        return per_head.reshape(-1, *parts[0].shape[1:])

    return fuse_qkv(rename(state, inverse(_RENAMES)), "attention.query_key_value", fuse)


GPT_NEOX = Family("GPT-NeoX", ("gpt_neox",), _layout, _to_polyattn, _from_polyattn)
