"""The `"power_softmax_triton"` attention: the fused kernel where it applies, the eager path elsewhere.

The fused kernel computes exactly the training-time function: causal, exact reciprocal, stable
scaling, no dropout. Everything else — padding masks, the polynomial form, calibration and the
range loss (which watch the scores and the normaliser through hooks), attention dropout, CPUs
without the Triton interpreter — runs the eager reference `power_softmax_attention_forward`,
so switching the implementation never changes what a model computes.
"""

import importlib.util
import os

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..modeling.power_softmax import attention_parameters, power_softmax_attention_forward, power_softmax_mask

FUSED_ATTENTION_NAME = "power_softmax_triton"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _hooked(module: nn.Module | None) -> bool:
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks)


def _is_causal_mask(mask: torch.Tensor | None, q_len: int, kv_len: int) -> bool:
    """Whether a boolean keep-mask is the plain causal one (queries = the last `q_len` positions)."""
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.shape[-2] != q_len or mask.shape[-1] < kv_len:
        return False
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    return bool((mask[..., :kv_len] == causal).all())


def fused_path_refusal(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask, dropout: float
) -> str | None:
    """Why this call cannot take the fused kernel (`None` when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if not (query.is_cuda or _interpreting()):
        return "the tensors are not on a CUDA device (and TRITON_INTERPRET=1 is not set)"
    params = attention_parameters(module.config)
    if not params["attn_stable_scaling"] or getattr(module, "score_scale", None) is not None:
        return "the polynomial form's static score scale"
    reciprocal = getattr(module, "reciprocal", None)
    if getattr(reciprocal, "approximation", None) is not None:
        return "the polynomial form's reciprocal"
    if _hooked(reciprocal) or _hooked(getattr(module, "score_probe", None)):
        return "hooks watch the scores or the normaliser (calibration, range loss)"
    if dropout and module.training:
        return "attention dropout"
    if not getattr(module, "is_causal", True):
        return "non-causal attention"
    if not _is_causal_mask(attention_mask, query.shape[2], key.shape[2]):
        return "the mask is not the plain causal mask (padding)"
    return None


def fused_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention-interface entry point; like SDPA it returns no weights on the fused path."""
    if fused_path_refusal(module, query, key, attention_mask, dropout) is not None:
        return power_softmax_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    from .power_softmax_triton import fused_power_softmax_attention

    params = attention_parameters(module.config)
    output = fused_power_softmax_attention(
        query,
        key,
        value,
        scaling if scaling is not None else query.shape[-1] ** -0.5,
        power=params["attn_power"],
        eps=params["attn_eps"],
        form=params["attn_form"],
        scale_delta=params["attn_scale_delta"],
    )
    return output.transpose(1, 2).contiguous(), None


def fused_attention_mask(*args, **kwargs) -> torch.Tensor | None:
    """SDPA's boolean keep-mask, or `None` where it is the plain causal mask (no padding): then the
    kernel runs without reading or checking a T×T mask (and the eager fallback reads `None` as
    causal too)."""
    return power_softmax_mask(*args, keep_causal_shortcut=True, **kwargs)


def register() -> None:
    """Register `"power_softmax_triton"` with transformers' attention and mask interfaces."""
    AttentionInterface.register(FUSED_ATTENTION_NAME, fused_attention_forward)
    AttentionMaskInterface.register(FUSED_ATTENTION_NAME, fused_attention_mask)
