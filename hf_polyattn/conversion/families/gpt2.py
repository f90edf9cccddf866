"""GPT-2: LayerNorm, plain GELU MLP, learned positions, fused QKV in `Conv1D` (transposed) layers."""

import re
from typing import Any

import torch

from .base import Family, StateDict, fuse_qkv, inverse, rename, split_fused_qkv

_RENAMES = [
    ("transformer.wte.", "model.embed_tokens."),
    ("transformer.wpe.", "model.embed_positions."),
    ("transformer.ln_f.", "model.norm."),
    ("transformer.h.", "model.layers."),
    (".ln_1.", ".input_layernorm."),
    (".ln_2.", ".post_attention_layernorm."),
    (".attn.c_proj.", ".self_attn.o_proj."),
    (".mlp.c_fc.", ".mlp.up_proj."),
    (".mlp.c_proj.", ".mlp.down_proj."),
]
# Conv1D stores (in, out): these weights are transposed to nn.Linear's (out, in).
_CONV1D = re.compile(r".*\.(self_attn\.o_proj|mlp\.up_proj|mlp\.down_proj)\.weight$")
_FUSED = re.compile(r"(.*)\.attn\.c_attn\.(weight|bias)$")


def _check(config) -> None:
    if config.scale_attn_by_inverse_layer_idx or not config.scale_attn_weights:
        raise ValueError(
            "cannot convert a GPT-2 checkpoint with scale_attn_by_inverse_layer_idx=True or "
            "scale_attn_weights=False: PolyAttn scales scores by 1/sqrt(head_dim)"
        )
    if config.add_cross_attention:
        raise ValueError("cannot convert a GPT-2 checkpoint with cross-attention: PolyAttn is decoder-only")


def _layout(config) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.n_inner or 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "hidden_act": config.activation_function,
        "max_position_embeddings": config.n_positions,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.layer_norm_epsilon,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": True,
        "mlp_bias": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "norm_type": "layer",
        "mlp_type": "plain",
        "position_embedding_type": "learned",
    }


def _to_polyattn(state: StateDict, config) -> StateDict:
    def split(tensor: torch.Tensor, kind: str) -> tuple[torch.Tensor, ...]:
        parts = tensor.split(config.n_embd, dim=-1)  # (in, 3·out) / (3·out,)
        return tuple(part.t().contiguous() if kind == "weight" else part for part in parts)

    # old checkpoints carry causal-mask buffers: not weights
    state = {n: t for n, t in state.items() if not n.endswith((".attn.bias", ".attn.masked_bias"))}
    out = rename(split_fused_qkv(state, _FUSED, split), _RENAMES)
    return {name: t.t().contiguous() if _CONV1D.match(name) else t for name, t in out.items()}


def _from_polyattn(state: StateDict, config) -> StateDict:
    def fuse(parts: list[torch.Tensor], kind: str) -> torch.Tensor:
        return torch.cat([p.t() for p in parts], dim=-1).contiguous() if kind == "weight" else torch.cat(parts)

    state = {name: t.t().contiguous() if _CONV1D.match(name) else t for name, t in state.items()}
    return rename(fuse_qkv(state, "attn.c_attn", fuse), inverse(_RENAMES))


GPT2 = Family("GPT-2", ("gpt2",), _layout, _to_polyattn, _from_polyattn, _check)
