"""What a source family must say to convert: its layout and its weight names."""

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
