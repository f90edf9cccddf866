"""Fused kernels (GPU, Triton) behind `attn_implementation="power_softmax_triton"`.

Importing this package needs no Triton: the kernels are imported on first use, and every case
they do not cover falls back to the eager `"power_softmax"` path.
"""

from .attention import FUSED_ATTENTION_NAME, fused_attention_forward, fused_path_refusal, register

__all__ = ["FUSED_ATTENTION_NAME", "fused_attention_forward", "fused_path_refusal", "register"]
