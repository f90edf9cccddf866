"""Power-Softmax attention: `x_j^p / (eps + Σ_i x_i^p)` in place of `exp(x_j) / Σ_i exp(x_i)`.

Registered on import as `"power_softmax"` in both transformers' `AttentionInterface` and
`AttentionMaskInterface`, so any model that dispatches through the attention interface (Llama,
GPT-NeoX, GPT-2, PolyAttn) runs it with `attn_implementation="power_softmax"`.

Masking is a multiplication by a 0/1 mask (there is no -inf under encryption), and a masked key
contributes exactly zero to both the numerator and the normaliser.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "power_softmax"

# What a model whose config lacks the PolyAttn fields (a stock Llama, GPT-NeoX, GPT-2) runs with.
DEFAULT_ATTENTION_PARAMETERS = {
    "attn_power": 4,
    "attn_eps": 1e-6,
    "attn_form": "sum",
    "attn_stable_scaling": True,
    "attn_scale_delta": 1e-4,
}

Reciprocal = Callable[[torch.Tensor], torch.Tensor]


def exact_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """`1 / x`, with rows whose normaliser is exactly 0 (fully masked queries) mapped to 0, not inf."""
    return torch.where(x == 0, torch.zeros_like(x), 1.0 / torch.where(x == 0, torch.ones_like(x), x))


def power_softmax(
    scores: torch.Tensor,
    power: int = 4,
    eps: float = 0.0,
    mask: torch.Tensor | None = None,
    form: str = "sum",
    stable_scaling: bool = True,
    scale_delta: float = 1e-4,
    reciprocal: Reciprocal = exact_reciprocal,
    score_scale: float | None = None,
) -> torch.Tensor:
    """Power-Softmax along the last dimension, computed in float32 (float64 stays float64).

    Args:
        scores: attention scores `(..., q_len, kv_len)`.
        power: the even power `p`.
        eps: the floor added to the normaliser (see `PolyAttnConfig.attn_eps`).
        mask: 0/1 or boolean mask broadcastable to `scores`; 1 keeps a key. `None` keeps all.
        form: `"sum"` → `x_j^p / (eps + Σ_i x_i^p)`; `"mean"` → `x_j^p / (L·(eps + Mean_i x_i^p))`
            with `L` the number of kept keys in the row. Either way a row sums to `S / (eps + S)`
            with `S` the sum (resp. mean) of the kept `x_i^p`: exactly 1 when `eps = 0`.
        stable_scaling: divide the scores by `c = max|x| + scale_delta` first and the floor by
            `c^p`: the same function, without `x^p` overflowing.
        scale_delta: the `δ` of the stable scaling.
        reciprocal: how `1/normaliser` is computed; the polynomial form passes its iterative
            approximation here so exact and polynomial attention share every other step.
        score_scale: a public constant `C` to divide the scores by (and the floor by `C^p`)
            instead of the data-dependent max: the polynomial form's way to keep `x^p` in range.
            Given, it replaces `stable_scaling`.

    Returns:
        The attention weights, same shape as `scores`, non-negative, zero on masked keys.
    """
    if power < 2 or power % 2:
        raise ValueError(f"power must be an even integer >= 2, got {power}")
    if form not in ("sum", "mean"):
        raise ValueError(f"form must be 'sum' or 'mean', got {form!r}")
    x = scores if scores.dtype == torch.float64 else scores.float()
    keep = None if mask is None else mask.to(x.dtype)
    if keep is not None:
        # Masked scores are zeroed before any scaling: scaled by the *kept* max, a large masked
        # score's power overflows to inf, and inf · 0 would make the whole row NaN.
        x = x * keep

    floor = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if score_scale is not None:
        if not score_scale > 0:
            raise ValueError(f"score_scale must be > 0, got {score_scale}")
        x = x * (1.0 / score_scale)
        floor = floor * (1.0 / score_scale) ** power
    elif stable_scaling:
        # c depends on the scores but the function does not (it is homogeneous of degree 0 once the
        # floor is rescaled too), so c carries no gradient.
        magnitude = x.abs()
        inv_c = 1.0 / (magnitude.amax(dim=-1, keepdim=True).detach() + scale_delta)
        x = x * inv_c
        floor = floor * inv_c**power  # underflows to 0 (the right limit) instead of overflowing

    numerator = x**power
    total = numerator.sum(dim=-1, keepdim=True)
    if form == "sum":
        return numerator * reciprocal(floor + total)
    # Built from shapes and the mask only: the row lengths are public, never derived from the scores.
    if keep is None:
        length = torch.full(total.shape, float(x.shape[-1]), dtype=x.dtype, device=x.device)
    else:
        length = keep.expand(x.shape).sum(-1, keepdim=True)
    inv_length = exact_reciprocal(length)  # public: positions and padding are known to both sides
    return numerator * (reciprocal(floor + total * inv_length) * inv_length)


def attention_parameters(config) -> dict:
    """The Power-Softmax fields of `config`, defaulted for configs of stock (softmax) families."""
    return {name: getattr(config, name, default) for name, default in DEFAULT_ATTENTION_PARAMETERS.items()}


def _keep_mask(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device, causal: bool = True
) -> torch.Tensor:
    """A boolean keep-mask `(b, 1, q, kv)`; transformers' additive float masks use 0 for keep."""
    if attention_mask is None:
        if not causal:
            return torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
        # No mask was built (e.g. a caller bypassing the mask interface): stay causal, queries are the
        # last q_len positions of the kv_len seen so far.
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
        return (torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None])[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :kv_len]
    return attention_mask[..., :kv_len] == 0


def power_softmax_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-interface entry point: `(b, h, q, d)` queries, `(b, h_kv, k, d)` keys/values.

    Grouped KV heads are handled by reshaping the queries into groups rather than repeating K/V.
    A module may carry `reciprocal` (the normaliser's 1/x), `score_probe` (sees the scores) and
    `score_scale` (a static score scale): PolyAttn's attention does, for its polynomial form.
    Returns the output as `(b, q, h, d)` and the weights as `(b, h, q, k)`, like transformers'
    eager attention.
    """
    params = attention_parameters(module.config)
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads do not divide {heads} query heads")
    groups = heads // kv_heads
    if scaling is None:
        scaling = head_dim**-0.5

    grouped_query = query.reshape(batch, kv_heads, groups, q_len, head_dim)
    scores = torch.matmul(grouped_query, key.unsqueeze(2).transpose(-1, -2)) * scaling
    # A PolyAttn attention module carries its polynomial-form pieces; stock modules run exact.
    score_probe = getattr(module, "score_probe", None)
    if score_probe is not None:
        scores = score_probe(scores)
    score_scale = getattr(module, "score_scale", None)
    causal = getattr(module, "is_causal", True)
    keep = _keep_mask(attention_mask, q_len, kv_len, query.device, causal).unsqueeze(2)  # (b|1, 1, 1, q, k)
    weights = power_softmax(
        scores,
        power=params["attn_power"],
        eps=params["attn_eps"],
        mask=keep,
        form=params["attn_form"],
        stable_scaling=params["attn_stable_scaling"],
        scale_delta=params["attn_scale_delta"],
        reciprocal=getattr(module, "reciprocal", exact_reciprocal),
        score_scale=score_scale,
    ).to(value.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value.unsqueeze(2))  # (b, h_kv, g, q, d)
    output = output.reshape(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()
    return output, weights.reshape(batch, heads, q_len, kv_len)


def power_softmax_mask(*args, keep_causal_shortcut: bool = False, **kwargs) -> torch.Tensor | None:
    """A boolean `(b, 1, q, kv)` keep-mask, always materialised: there is no `is_causal` shortcut.

    `keep_causal_shortcut=True` (the fused kernel's mask) lets SDPA's builder return `None` for a
    plain causal mask instead, which `power_softmax_attention_forward` also reads as causal.
    """
    if not keep_causal_shortcut:
        kwargs["allow_is_causal_skip"] = False
    kwargs.pop("dtype", None)
    kwargs.pop("config", None)
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, power_softmax_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, power_softmax_mask)

__all__ = [
    "ATTENTION_NAME",
    "attention_parameters",
    "exact_reciprocal",
    "power_softmax",
    "power_softmax_attention_forward",
    "power_softmax_mask",
]
