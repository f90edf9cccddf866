"""What a source family must say to convert: its layout and its weight names."""

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """A softmax family that converts into PolyAttn.

    Attributes:
        name: shown in errors and reports.
        model_types: the `config.model_type`s it covers.
        layout: source config → the `PolyAttnConfig` fields (shapes, eps, layout fields).
        to_polyattn: source state dict (+ config) → PolyAttn state dict.
        from_polyattn: the inverse, PolyAttn state dict (+ source config) → source state dict.
        check: raises `ValueError` for source configs the map cannot represent exactly.
    """

    name: str
    model_types: tuple[str, ...]
    layout: Callable[[Any], dict[str, Any]]
    to_polyattn: Callable[[StateDict, Any], StateDict]
    from_polyattn: Callable[[StateDict, Any], StateDict]
    check: Callable[[Any], None] = lambda config: None


def rename(state: StateDict, renames: list[tuple[str, str]]) -> StateDict:
    """Apply every matching `(old, new)` of `renames`, in order, once each, to every key."""
    renamed = {}
    for name, tensor in state.items():
        for old, new in renames:
            name = name.replace(old, new, 1)
        renamed[name] = tensor
    return renamed


def inverse(renames: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The renames that undo `renames`."""
    return [(new, old) for old, new in reversed(renames)]


def rope_fields(config) -> dict[str, Any]:
    """PolyAttn's `rope_parameters` for a RoPE source; only the default RoPE converts exactly."""
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"cannot convert rope_type {rope['rope_type']!r}: only 'default' RoPE")
    return {"rope_parameters": rope}


QKV = ("q_proj", "k_proj", "v_proj")
_Q_PROJ = re.compile(r"(.*)\.self_attn\.q_proj\.(weight|bias)$")


def split_fused_qkv(
    state: StateDict, fused: re.Pattern, split: Callable[[torch.Tensor, str], tuple[torch.Tensor, ...]]
) -> StateDict:
    """Replace every tensor whose name `fused` matches (groups: layer prefix, `weight`/`bias`) by
    the `self_attn.{q,k,v}_proj` tensors `split(tensor, kind)` returns."""
    out = {}
    for name, tensor in state.items():
        match = fused.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix, kind = match.groups()
        for projection, part in zip(QKV, split(tensor, kind)):
            out[f"{prefix}.self_attn.{projection}.{kind}"] = part
    return out


def fuse_qkv(state: StateDict, fused_name: str, fuse: Callable[[list[torch.Tensor], str], torch.Tensor]) -> StateDict:
    """The inverse of `split_fused_qkv`: each layer's `self_attn.{q,k,v}_proj` tensors become one
    tensor `{prefix}.{fused_name}.{kind}`, `fuse([q, k, v], kind)`."""
    out = {}
    for name, tensor in state.items():
        match = _Q_PROJ.match(name)
        if match:
            prefix, kind = match.groups()
            out[f"{prefix}.{fused_name}.{kind}"] = fuse([state[f"{prefix}.self_attn.{p}.{kind}"] for p in QKV], kind)
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            out[name] = tensor
    return out
