"""What the resumable training stages share on disk: atomic writes, token blocks and their hash.

A stage killed mid-write (a budget, Ctrl-C, a crash) must never leave a half-written manifest,
state or shard behind that a resumed run would trust: everything is written to a temporary name
and renamed into place.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path`, all or nothing."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save `tensors` as safetensors to `path`, all or nothing."""
    partial = path.with_name(path.name + ".partial")
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(partial))
    os.replace(partial, path)


def as_token_blocks(blocks: Any) -> torch.Tensor:
    """Token blocks as one `[N, T]` int64 CPU tensor, from a tensor, a list of equal-length blocks,
    or a dataset (or dict) with an `input_ids` column."""
    if hasattr(blocks, "column_names") or isinstance(blocks, dict):
        blocks = blocks["input_ids"]
    if not isinstance(blocks, torch.Tensor):
        blocks = [torch.as_tensor(block) for block in blocks]
        if not blocks:
            raise ValueError("no token blocks")
        lengths = {len(block) for block in blocks}
        if len(lengths) > 1:
            raise ValueError(f"token blocks must all have the same length, got lengths {sorted(lengths)}")
        blocks = torch.stack(blocks)
    if blocks.dim() != 2 or blocks.numel() == 0:
        raise ValueError(f"token blocks must be a non-empty [N, T] tensor, got shape {tuple(blocks.shape)}")
    return blocks.to(torch.int64).cpu().contiguous()


def token_hash(blocks: torch.Tensor) -> str:
    """SHA-256 of a `[N, T]` id tensor (shape and values), as hex: which tokens a record was made on."""
    ids = blocks.to(torch.int64).contiguous()
    digest = hashlib.sha256(str(tuple(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()
