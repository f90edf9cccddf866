"""Softmax checkpoints → PolyAttn: same weights, Power-Softmax attention.

Each source family (`families/`) says which PolyAttn layout its config implies and how its state
dict maps onto PolyAttn's names; a Llama-family checkpoint (Llama, SmolLM2, Mistral without a
sliding window) is PolyAttn's layout as it is. The model then needs a brief distillation to
recover its quality (`DistillationTrainer`).
"""

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..modeling import PolyAttnConfig, PolyAttnForCausalLM
from ..modeling.power_softmax import DEFAULT_ATTENTION_PARAMETERS
from .families import family_of

ATTENTION_FIELDS = tuple(DEFAULT_ATTENTION_PARAMETERS)


def polyattn_config_from(config, **attention: Any) -> PolyAttnConfig:
    """The `PolyAttnConfig` of a source family's `config`, with the given attention fields."""
    unknown = set(attention) - set(ATTENTION_FIELDS)
    if unknown:
        raise TypeError(f"unknown attention fields {sorted(unknown)}; expected some of {ATTENTION_FIELDS}")
    return PolyAttnConfig(**family_of(config).layout(config), **attention)


def convert_checkpoint(
    model_or_path: PreTrainedModel | str | Path,
    attn_power: int = 4,
    attn_eps: float = 1e-6,
    attn_form: str = "sum",
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> PolyAttnForCausalLM:
    """A PolyAttn model holding exactly the weights of a softmax checkpoint.

    Args:
        model_or_path: a loaded causal LM, or a local folder (with `gguf_file` for a GGUF file),
            of a supported family (Llama/SmolLM2/Mistral, Qwen2, GPT-NeoX/Pythia, GPT-2, Gemma,
            Gemma 3; `families.supported_model_types()` lists them).
        attn_power / attn_eps / attn_form: the Power-Softmax attention (see `PolyAttnConfig`).
        gguf_file: a GGUF file in the folder; it is dequantised on loading.
        dtype: the dtype of the converted weights.
    """
    if isinstance(model_or_path, (str, Path)):
        source = AutoModelForCausalLM.from_pretrained(model_or_path, gguf_file=gguf_file, dtype=dtype)
    else:
        source = model_or_path
    family = family_of(source.config)
    config = polyattn_config_from(source.config, attn_power=attn_power, attn_eps=attn_eps, attn_form=attn_form)
    model = PolyAttnForCausalLM(config).to(dtype)
    source_state = {name: tensor.detach().to(dtype) for name, tensor in source.state_dict().items()}
    state = family.to_polyattn(source_state, source.config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{family.name} weight map mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config = source.generation_config
    return model.eval()


def export_weights(model: PolyAttnForCausalLM, source_config) -> dict[str, torch.Tensor]:
    """A converted model's weights in the source family's names and shapes (the inverse map).

    `type(source)(source_config).load_state_dict(export_weights(model, source_config))` gives
    back a softmax model of the source class, e.g. to run a distilled model in stock code.
    """
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    return family_of(source_config).from_polyattn(state, source_config)
