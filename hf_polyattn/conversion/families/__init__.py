"""Weight maps from softmax families into PolyAttn's layout, and back.

Each family module defines a `Family`: the PolyAttn layout fields its config implies, and the
renaming/splitting of its state dict into PolyAttn's (and the inverse, which the tests use to
prove the map loses nothing).
"""

from .base import Family
from .gemma import GEMMA
from .gpt2 import GPT2
from .gpt_neox import GPT_NEOX
from .llama import LLAMA, QWEN2

FAMILIES: tuple[Family, ...] = (LLAMA, QWEN2, GPT_NEOX, GPT2, GEMMA)


def supported_model_types() -> list[str]:
    """Every source `model_type` that converts."""
    return [model_type for family in FAMILIES for model_type in family.model_types]


def family_of(config) -> Family:
    """The family of a source config; a clear error listing the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            family.check(config)
            return family
    raise ValueError(
        f"cannot convert a {model_type!r} checkpoint: supported source architectures are "
        f"{', '.join(supported_model_types())}. Other families still run Power-Softmax directly "
        "with attn_implementation='power_softmax'."
    )


__all__ = ["FAMILIES", "Family", "family_of", "supported_model_types"]
