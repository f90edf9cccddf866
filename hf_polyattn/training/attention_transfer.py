"""Attention transfer (Hedgehog / LoLCATs): teach each converted layer's attention to reproduce its
softmax teacher's attention output, one layer at a time, before any end-to-end distillation.

Two steps, each resumable:

1. `record_teacher` runs the teacher over token blocks and streams, for every layer, the input of
   its attention (the hidden state after the layer's input norm) and its output (after the output
   projection) to disk as bf16 safetensors shards, with a `manifest.json`.
2. `transfer_attention` trains each PolyAttn layer's attention projections (MSE to the teacher's
   output) on the recorded data, layer by layer, and writes one checkpoint per finished layer plus
   a `state.json`: an interrupted run resumes where it stopped and ends with exactly the weights
   of an uninterrupted one.

Everything is captured with hooks on the attention modules, so the teacher may be any family
that converts (Llama, GPT-NeoX's parallel residual, GPT-2's learned positions, Gemma's sandwich
norms): what the attention module sees and returns is the same in the teacher and its converted
student, whatever surrounds it.
"""

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers.utils.logging import tqdm

from ..modeling.modeling_polyattn import PolyAttnModel
from ..modeling.power_softmax import DEFAULT_ATTENTION_PARAMETERS
from .storage import as_token_blocks, save_tensors_atomic, token_hash, write_json_atomic

FORMAT = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.safetensors"
STATE = "state.json"
DEFAULT_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj")
RECORD_DTYPE = torch.bfloat16  # halves the disk and RAM of a recording; ~0.4 % relative precision


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs is captured (saves the rest)."""


# ---------------------------------------------------------------------------------------- helpers


def _sha256(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:16]


def teacher_identity(teacher: nn.Module, name: str | None = None) -> dict[str, str | None]:
    """What identifies a teacher: a caller-given `name` (shown only) and hashes of its config and of
    a fixed strided sample of every weight (exact bytes, so independent of threads and order)."""
    config = {k: v for k, v in teacher.config.to_dict().items() if not k.startswith("_")}
    for volatile in ("transformers_version", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    chunks = []
    for param_name, tensor in sorted(teacher.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        chunks += [param_name.encode(), str(tuple(tensor.shape)).encode(), sample.numpy().tobytes()]
    return {
        "name": name,
        "model_type": teacher.config.model_type,
        "config_hash": _sha256(json.dumps(config, sort_keys=True, default=str).encode()),
        "weights_hash": _sha256(*chunks),
    }


def _describe_teacher(identity: dict) -> str:
    shown = identity.get("name") or identity["model_type"]
    return f"{shown} (config {identity['config_hash']}, weights {identity['weights_hash']})"


def _same_teacher(a: dict, b: dict) -> bool:
    # The name is whatever the caller typed (a relative or absolute path): not part of the identity.
    return all(a[k] == b[k] for k in ("model_type", "config_hash", "weights_hash"))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (`layers` of Llama/PolyAttn/GPT-NeoX, `h` of GPT-2)."""
    count = model.config.num_hidden_layers
    for module in model.base_model.children():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise NotImplementedError(
        f"cannot find the {count} decoder layers of a {type(model).__name__}: expected a ModuleList of them "
        "directly under its base model"
    )


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's attention module (`self_attn`, GPT-NeoX's `attention`, GPT-2's `attn`)."""
    modules = []
    for layer in _decoder_layers(model):
        found = next((getattr(layer, n) for n in ("self_attn", "attention", "attn") if hasattr(layer, n)), None)
        if found is None:
            raise NotImplementedError(
                f"cannot find the attention of a {type(layer).__name__}: expected a `self_attn`, `attention` or "
                "`attn` submodule"
            )
        modules.append(found)
    return modules


def _layer_file(record_dir: Path, layer: int, shard: int) -> Path:
    return record_dir / f"layer_{layer:03d}" / f"shard_{shard:05d}.safetensors"


# -------------------------------------------------------------------------------------- recording


def record_teacher(
    teacher: nn.Module,
    blocks: torch.Tensor | Sequence,
    record_dir: str | Path,
    *,
    name: str | None = None,
    batch_size: int = 4,
    shard_tokens: int = 16384,
    max_layers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Record every layer's attention input and output of `teacher` on token `blocks`.

    Writes `record_dir/layer_{i}/shard_{s}.safetensors` (`inputs`, `targets`: `[blocks, T, hidden]`
    bf16), `tokens.safetensors` and `manifest.json`. Shards are written as they fill, so RAM holds
    about one shard (`shard_tokens` tokens × layers × 2 hidden states); a re-run with the same
    teacher and tokens skips the shards already on disk and returns at once when all are.

    Args:
        teacher: the softmax causal LM (any family whose layers have a `self_attn`, `attention` or
            `attn` module).
        blocks: token ids, an `[N, T]` tensor or a list of N equal-length blocks.
        record_dir: where to write; a recording of another teacher or other tokens there is refused.
        name: how to show the teacher (e.g. the name or path it was loaded from).
        batch_size: blocks per teacher forward pass.
        shard_tokens: tokens per shard (rounded down to whole blocks, at least one).
        max_layers: record only the first layers (the forward pass stops after the last one).
        progress: show a progress bar with an ETA.

    Returns:
        The manifest.
    """
    tokens = as_token_blocks(blocks)
    record_dir = Path(record_dir)
    attention = _attention_modules(teacher)
    layers = len(attention) if max_layers is None else max_layers
    if not 1 <= layers <= len(attention):
        raise ValueError(f"max_layers must be in [1, {len(attention)}], got {max_layers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count, block_size = tokens.shape
    per_shard = max(1, shard_tokens // block_size)
    manifest = {
        "format": FORMAT,
        "teacher": teacher_identity(teacher, name),
        "hidden_size": teacher.config.hidden_size,
        "layers": layers,
        "blocks": count,
        "block_size": block_size,
        "tokens": count * block_size,
        "tokens_hash": token_hash(tokens),
        "dtype": str(RECORD_DTYPE).removeprefix("torch."),
        "blocks_per_shard": per_shard,
        "shards": -(-count // per_shard),
        "shards_done": 0,
        "complete": False,
    }
    path = record_dir / MANIFEST
    if path.is_file():
        previous = json.loads(path.read_text())
        if not _same_teacher(previous["teacher"], manifest["teacher"]):
            raise ValueError(
                f"teacher: {record_dir} holds a recording of {_describe_teacher(previous['teacher'])}, this teacher is "
                f"{_describe_teacher(manifest['teacher'])}; record into another folder"
            )
        for field in ("tokens_hash", "block_size", "blocks", "blocks_per_shard", "layers", "dtype"):
            if previous.get(field) != manifest[field]:
                raise ValueError(
                    f"{field}: {record_dir} holds a recording made with {previous.get(field)!r}, this call asks for "
                    f"{manifest[field]!r}; record into another folder"
                )
        if previous["complete"]:
            return previous
        manifest["shards_done"] = previous["shards_done"]
    else:
        record_dir.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic({"input_ids": tokens}, record_dir / TOKENS)
        write_json_atomic(path, manifest)

    captured: list[dict[str, list[torch.Tensor]]] = [{"inputs": [], "targets": []} for _ in range(layers)]

    def keep_input(index):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[index]["inputs"].append(hidden.detach().to(RECORD_DTYPE))

        return hook

    def keep_output(index):
        def hook(module, args, kwargs, output):
            output = output[0] if isinstance(output, tuple) else output
            captured[index]["targets"].append(output.detach().to(RECORD_DTYPE))
            if index == layers - 1:
                raise _Stop  # the layers above (and the LM head) are not needed

        return hook

    handles = []
    for index in range(layers):
        handles.append(attention[index].register_forward_pre_hook(keep_input(index), with_kwargs=True))
        handles.append(attention[index].register_forward_hook(keep_output(index), with_kwargs=True))
    done = manifest["shards_done"] * per_shard
    bar = tqdm(total=count * block_size, initial=done * block_size, desc="recording the teacher", unit="tok",
               unit_scale=True, disable=not progress)
    was_training = teacher.training
    teacher.eval()
    try:
        for shard in range(manifest["shards_done"], manifest["shards"]):
            for start in range(shard * per_shard, min((shard + 1) * per_shard, count), batch_size):
                batch = tokens[start : min(start + batch_size, (shard + 1) * per_shard, count)]
                try:
                    with torch.no_grad():
                        teacher.base_model(input_ids=batch.to(teacher.device), use_cache=False)
                except _Stop:
                    pass
                bar.update(batch.numel())
            for index in range(layers):
                _layer_file(record_dir, index, shard).parent.mkdir(exist_ok=True)
                pieces = {key: torch.cat(values).cpu() for key, values in captured[index].items()}
                save_tensors_atomic(pieces, _layer_file(record_dir, index, shard))
                captured[index] = {"inputs": [], "targets": []}
            manifest["shards_done"] = shard + 1
            manifest["complete"] = shard + 1 == manifest["shards"]
            write_json_atomic(path, manifest)  # after the shard's files: a listed shard is always whole
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)
        bar.close()
    return manifest


def read_manifest(record_dir: str | Path) -> dict[str, Any]:
    """The manifest of a complete recording; a clear error for an empty or unfinished one."""
    path = Path(record_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{record_dir} holds no recording (no {MANIFEST}): run record_teacher first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}; this version reads format {FORMAT}")
    if not manifest["complete"]:
        raise ValueError(
            f"the recording in {record_dir} is unfinished ({manifest['shards_done']} of {manifest['shards']} shards): "
            "run record_teacher again to finish it"
        )
    return manifest


def _load_layer(record_dir: Path, manifest: dict, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All recorded `(inputs, targets)` of one layer, `[N, T, hidden]` bf16 (training shuffles over all)."""
    shards = [load_file(str(_layer_file(record_dir, layer, s))) for s in range(manifest["shards"])]
    return torch.cat([s["inputs"] for s in shards]), torch.cat([s["targets"] for s in shards])


# --------------------------------------------------------------------------------------- transfer


def _layer_call(base: PolyAttnModel, index: int, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """The hidden-state input and the keyword arguments (position embeddings, mask, …) that decoder
    layer `index` receives when `base` runs `ids`; the forward pass stops there."""
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = base.layers[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            base(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


class _LayerKwargs:
    """Decoder layer `index`'s keyword arguments per batch size, captured once from the student itself
    (so per-layer RoPE bases, learned positions and the mask function are whatever the model uses)."""

    def __init__(self, base: PolyAttnModel, index: int, block_size: int):
        self.base, self.index, self.block_size = base, index, block_size
        self.cache: dict[int, dict[str, Any]] = {}

    def __call__(self, batch: int) -> dict[str, Any]:
        if batch not in self.cache:
            ids = torch.zeros(batch, self.block_size, dtype=torch.long, device=self.base.device)
            self.cache[batch] = _layer_call(self.base, self.index, ids)[1]
        return self.cache[batch]


def _batches(count: int, batch_size: int, order: torch.Tensor | None = None):
    order = torch.arange(count) if order is None else order
    return [order[start : start + batch_size] for start in range(0, count, batch_size)]


def _relative_error(
    attention: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kwargs: _LayerKwargs, batch_size: int, autocast: bool
) -> float:
    """`‖y_student − y_teacher‖ / ‖y_teacher‖` over all recorded tokens."""
    dtype, device = attention.o_proj.weight.dtype, attention.o_proj.weight.device
    error = total = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for index in _batches(len(inputs), batch_size):
            output = attention(hidden_states=inputs[index].to(device, dtype), **kwargs(len(index)))[0]
            target = targets[index].to(device, torch.float64)
            error += float((output.double() - target).pow(2).sum())
            total += float(target.pow(2).sum())
    return (error / max(total, 1e-30)) ** 0.5


def _settings(student: nn.Module, manifest: dict, params, lr, epochs, batch_size, inputs, seed, autocast) -> dict:
    """Everything that decides the trained weights: a resumed run must match all of it."""
    config = student.config
    return {
        "teacher": manifest["teacher"],
        "tokens_hash": manifest["tokens_hash"],
        **{field: getattr(config, field) for field in DEFAULT_ATTENTION_PARAMETERS},
        "params": list(params),
        "lr": lr,
        "epochs": epochs,
        "batch_size": batch_size,
        "inputs": inputs,
        "seed": seed,
        "autocast": autocast,
    }


_STUDENT_FIELDS = set(DEFAULT_ATTENTION_PARAMETERS)


def _check_resume(out_dir: Path, settings: dict) -> dict:
    """The state of a previous run in `out_dir` (or a fresh one); a `ValueError` naming the first
    setting that differs, since resuming across it would mix two different transfers."""
    path = out_dir / STATE
    if not path.is_file():
        return {"format": FORMAT, "settings": settings, "layers": []}
    state = json.loads(path.read_text())
    previous = state["settings"]
    if not _same_teacher(previous["teacher"], settings["teacher"]):
        raise ValueError(
            f"teacher: the checkpoint in {out_dir} was made with {_describe_teacher(previous['teacher'])}, this "
            f"recording is of {_describe_teacher(settings['teacher'])}"
        )
    for field, value in settings.items():
        if field != "teacher" and previous.get(field) != value:
            who = "this student has" if field in _STUDENT_FIELDS else "this run has"
            if field == "tokens_hash":
                who = "this recording has"
            raise ValueError(
                f"{field}: the checkpoint in {out_dir} was made with {previous.get(field)!r}, {who} {value!r}"
            )
    return state


def transfer_attention(
    student: nn.Module,
    record_dir: str | Path,
    out_dir: str | Path,
    params: Sequence[str] = DEFAULT_PARAMS,
    lr: float = 3e-3,
    epochs: int = 1,
    batch_size: int = 4,
    inputs: str = "teacher",
    seed: int = 0,
    max_layers: int | None = None,
    autocast: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train each layer's attention of a converted `student` to reproduce its teacher's recorded output.

    Layer by layer, only the named submodules of `layers[i].self_attn` are trained (Adam, reset
    per layer; the block order is shuffled by a generator seeded `seed + i`) to minimise the MSE
    between the student's attention output and the teacher's. After each layer, its trained
    parameters go to `out_dir/layer_{i}.safetensors` and `out_dir/state.json` lists it: a re-run
    loads the finished layers and continues, ending with exactly the weights of an uninterrupted
    run. The student is updated in place.

    Args:
        student: a converted PolyAttn causal LM (`convert_checkpoint`), in its exact form.
        record_dir: a complete `record_teacher` recording of its teacher.
        out_dir: where the per-layer checkpoints and the state go; a state made with another
            teacher, other tokens, other attention fields (`attn_power`, `attn_eps`, `attn_form`, …)
            or other training settings is refused with a `ValueError` naming the field.
        params: the attention submodules to train.
        lr: Adam's learning rate.
        epochs: passes over the recorded blocks per layer.
        batch_size: blocks per step.
        inputs: `"teacher"`: each layer learns on the teacher's recorded inputs (layers are
            independent). `"student"`: on the inputs the student itself produces, its earlier layers
            already transferred (targets stay the teacher's), so a layer learns to correct what the
            layers below it got wrong rather than assume they are perfect.
        seed: the base of the per-layer shuffling seeds.
        max_layers: transfer only the first layers (a later call with more resumes).
        autocast: run the forward/backward under CPU bf16 autocast. Power-Softmax still computes in
            float32 and the step is elementwise-bound: on 2 CPU cores SmolLM2's attention trained at
            the same ~0.32 s per 512-token block with and without it.
        progress: show progress bars with an ETA.

    Returns:
        One report per transferred layer (including those finished by an earlier run): `layer`,
        `error_before` / `error_after` (the relative output error over the recorded data, on the
        inputs it trained on), `steps`, `seconds`, and `resumed` (finished by an earlier run).
    """
    base = getattr(student, "base_model", None)
    if not isinstance(base, PolyAttnModel):
        raise TypeError(
            f"transfer_attention needs a PolyAttn model (convert_checkpoint's output), got {type(student).__name__}"
        )
    if getattr(student, "is_polynomial", False):
        raise ValueError("transfer the exact model: switch to the polynomial form (to_polynomial) afterwards")
    if inputs not in ("teacher", "student"):
        raise ValueError(f"inputs must be 'teacher' or 'student', got {inputs!r}")
    if not lr > 0 or epochs < 1 or batch_size < 1:
        raise ValueError(
            f"need lr > 0, epochs >= 1 and batch_size >= 1, got lr={lr}, epochs={epochs}, batch_size={batch_size}"
        )
    record_dir, out_dir = Path(record_dir), Path(out_dir)
    manifest = read_manifest(record_dir)
    config = student.config
    if manifest["hidden_size"] != config.hidden_size:
        raise ValueError(
            f"hidden size: the recording in {record_dir} holds {manifest['hidden_size']}-wide hidden states, this "
            f"student has hidden_size {config.hidden_size}"
        )
    layers = config.num_hidden_layers if max_layers is None else max_layers
    if not 1 <= layers <= config.num_hidden_layers:
        raise ValueError(f"max_layers must be in [1, {config.num_hidden_layers}], got {max_layers}")
    if layers > manifest["layers"]:
        raise ValueError(
            f"layers: the recording in {record_dir} holds the first {manifest['layers']} layers, transferring "
            f"{layers} needs them all (pass max_layers={manifest['layers']}, or record more)"
        )
    params = tuple(params)
    unknown = [name for name in params if not isinstance(getattr(base.layers[0].self_attn, name, None), nn.Module)]
    if not params or unknown:
        raise ValueError(
            f"params must name submodules of the attention (e.g. {DEFAULT_PARAMS}), got unknown {unknown or 'none'}"
        )
    state = _check_resume(out_dir, _settings(student, manifest, params, lr, epochs, batch_size, inputs, seed, autocast))
    out_dir.mkdir(parents=True, exist_ok=True)

    finished = {entry["layer"] for entry in state["layers"]}
    for index in sorted(finished):
        weights = load_file(str(out_dir / f"layer_{index:03d}.safetensors"))
        base.layers[index].self_attn.load_state_dict(weights, strict=False)
    todo = [index for index in range(layers) if index not in finished]
    earlier = [{**entry, "resumed": True} for entry in state["layers"] if entry["layer"] < layers]
    if not todo:
        return sorted(earlier, key=lambda e: e["layer"])

    tokens = load_file(str(record_dir / TOKENS))["input_ids"]
    block_size = manifest["block_size"]
    was_training = student.training
    grad_flags = {p: p.requires_grad for p in student.parameters()}
    student.eval().requires_grad_(False)  # eval: no dropout; gradients flow to the trained params only
    stream, stream_at = None, 0  # student mode: the residual stream entering layer `stream_at`
    report = []
    bar = tqdm(total=len(todo), desc="attention transfer", unit="layer", disable=not progress)
    try:
        for index in todo:
            kwargs = _LayerKwargs(base, index, block_size)
            layer_inputs, targets = _load_layer(record_dir, manifest, index)
            if inputs == "student":
                stream, stream_at = _advance_stream(base, tokens, stream, stream_at, index, batch_size)
                layer_inputs = _norm_in_batches(base.layers[index].input_layernorm, stream, batch_size)
            entry = _train_layer(base.layers[index].self_attn, params, layer_inputs, targets, kwargs, lr=lr,
                                 epochs=epochs, batch_size=batch_size, seed=seed + index, autocast=autocast,
                                 progress=progress, description=f"layer {index}")
            entry = {"layer": index, **entry}
            report.append({**entry, "resumed": False})
            attention = base.layers[index].self_attn
            trained = {
                f"{name}.{key}": tensor.detach().cpu()
                for name in params
                for key, tensor in getattr(attention, name).state_dict().items()
            }
            save_tensors_atomic(trained, out_dir / f"layer_{index:03d}.safetensors")
            state["layers"].append(entry)
            write_json_atomic(out_dir / STATE, state)  # after the weights: a listed layer's file is always whole
            bar.set_postfix(layer=index, before=f"{entry['error_before']:.3f}", after=f"{entry['error_after']:.3f}")
            bar.update(1)
    finally:
        bar.close()
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        student.train(was_training)
    return sorted(earlier + report, key=lambda e: e["layer"])


def _advance_stream(base: PolyAttnModel, tokens: torch.Tensor, stream, stream_at: int, index: int, batch_size: int):
    """The student's residual stream entering layer `index`. It is built from the embeddings and
    pushed one decoder layer at a time (the same calls whether or not the run was resumed, so a
    resumed run sees bit-identical inputs), keeping `[N, T, hidden]` in RAM instead of re-running
    the whole prefix for every layer."""
    batches = _batches(len(tokens), batch_size)
    if stream is None:
        stream = torch.cat([_layer_call(base, 0, tokens[b].to(base.device))[0] for b in batches])
        stream_at = 0
    with torch.no_grad():
        while stream_at < index:
            layer = base.layers[stream_at]
            kwargs = _LayerKwargs(base, stream_at, tokens.shape[1])
            stream = torch.cat([layer(stream[b], **kwargs(len(b))) for b in batches])
            stream_at += 1
    return stream, stream_at


def _norm_in_batches(norm: nn.Module, stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([norm(stream[b]).to(RECORD_DTYPE) for b in _batches(len(stream), batch_size)])


def _train_layer(
    attention: nn.Module,
    params: tuple[str, ...],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: _LayerKwargs,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    autocast: bool,
    progress: bool,
    description: str,
) -> dict[str, Any]:
    """Fit one attention module's `params` to the targets; its relative error before and after."""
    start = time.perf_counter()
    dtype, device = attention.o_proj.weight.dtype, attention.o_proj.weight.device
    before = _relative_error(attention, inputs, targets, kwargs, batch_size, autocast)
    trained = [p for name in params for p in getattr(attention, name).parameters()]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps = 0
    total = epochs * len(_batches(len(inputs), batch_size))
    with tqdm(total=total, desc=description, unit="step", leave=False, disable=not progress) as bar:
        for _ in range(epochs):
            for index in _batches(len(inputs), batch_size, torch.randperm(len(inputs), generator=generator)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    output = attention(hidden_states=inputs[index].to(device, dtype), **kwargs(len(index)))[0]
                loss = F.mse_loss(output.float(), targets[index].to(device, torch.float32))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                bar.update(1)
    for p in trained:
        p.requires_grad_(False)
    after = _relative_error(attention, inputs, targets, kwargs, batch_size, autocast)
    seconds = round(time.perf_counter() - start, 3)
    return {"error_before": before, "error_after": after, "steps": steps, "seconds": seconds}


__all__ = ["DEFAULT_PARAMS", "read_manifest", "record_teacher", "teacher_identity", "transfer_attention"]
