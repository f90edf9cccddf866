"""The self-contained model code (torch + transformers only); this folder is what a Hub push ships."""

from .configuration_polyattn import PolyAttnConfig
from .modeling_polyattn import PolyAttnForCausalLM, PolyAttnModel, PolyAttnPreTrainedModel
from .power_softmax import ATTENTION_NAME, power_softmax, power_softmax_attention_forward

__all__ = [
    "ATTENTION_NAME",
    "PolyAttnConfig",
    "PolyAttnForCausalLM",
    "PolyAttnModel",
    "PolyAttnPreTrainedModel",
    "power_softmax",
    "power_softmax_attention_forward",
]
