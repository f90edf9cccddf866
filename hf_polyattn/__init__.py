"""hf_polyattn: polynomial (Power-Softmax) LLMs for transformers, ready for CKKS inference.

Importing the package registers everything with transformers (and peft, when installed):
`AutoConfig` / `AutoModel` / `AutoModelForCausalLM` for `model_type="polyattn"`, the
`"power_softmax"` attention and mask functions (and `"power_softmax_triton"`, the fused kernel), the default LoRA target modules, the CKKS
session behind `generate(secure=True)` and `pipeline("secure-text-generation")`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling import (
    ATTENTION_NAME,
    PolyAttnConfig,
    PolyAttnForCausalLM,
    PolyAttnModel,
    PolyAttnPreTrainedModel,
    power_softmax,
)

__version__ = "0.1.0"

# LoRA on every attention projection: the layers Power-Softmax changes the inputs of.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _register() -> None:
    from . import generation, kernels, pipelines

    kernels.register()  # attn_implementation="power_softmax_triton": the fused kernel
    generation.register()  # generate(secure=True) runs over CKKS
    pipelines.register()  # pipeline("secure-text-generation")
    AutoConfig.register(PolyAttnConfig.model_type, PolyAttnConfig, exist_ok=True)
    AutoModel.register(PolyAttnConfig, PolyAttnModel, exist_ok=True)
    AutoModelForCausalLM.register(PolyAttnConfig, PolyAttnForCausalLM, exist_ok=True)
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:  # peft is optional at import time
        return
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(PolyAttnConfig.model_type, LORA_TARGET_MODULES)


_register()

__all__ = [
    "ATTENTION_NAME",
    "LORA_TARGET_MODULES",
    "PolyAttnConfig",
    "PolyAttnForCausalLM",
    "PolyAttnModel",
    "PolyAttnPreTrainedModel",
    "power_softmax",
]
