"""A teacher's top-k log-probabilities, computed once and stored, so distillation skips its forward.

On CPU the teacher's forward is a large part of every distillation step, and it is the same every
epoch and on every resume. `build_teacher_cache` runs the teacher once over the training blocks
and keeps, per position, its `k` most likely tokens with their log-probabilities and the log of
the probability mass left outside them (the "rest" bucket): `topk_distillation_kl` (in
`distill.py`) needs that mass for a KL that is exact at k = vocabulary size and, below it, still
pushes the student's mass off the tokens the teacher rejects (a KL over the renormalised top-k
alone would not). The rest mass is computed in fp32 from the full distribution and stored in fp32:
recovering it as `1 - Σ top-k` from 16-bit values would be noise for a peaked teacher.

Layout of a cache folder: `manifest.json` (teacher identity given by the caller, k, temperature,
block size, block count, a SHA-256 of the token ids, ...) and `shard-NNNNN.safetensors` files of
`blocks_per_shard` blocks each (input ids int32, top-k log-probabilities float16 or bfloat16,
top-k indices int32, rest log-mass float32). Shards are written atomically, so an interrupted
build resumes where it stopped; a folder made for other data, another teacher, k or temperature
is refused with `TeacherCacheMismatch`.
"""

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .storage import as_token_blocks, save_tensors_atomic, token_hash, write_json_atomic

CACHE_BATCH = 8  # blocks per teacher forward when building a cache; its rate is timed at this size

TOPK_LOGPROBS = "teacher_topk_logprobs"
TOPK_INDICES = "teacher_topk_indices"
REST_LOGPROB = "teacher_rest_logprob"
CACHED_TARGET_KEYS = (TOPK_LOGPROBS, TOPK_INDICES, REST_LOGPROB)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# What must agree between a cache folder and the run that wants to use it.
_IDENTITY_FIELDS = ("format", "teacher", "k", "temperature", "block_size", "num_blocks", "token_hash")
_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherCacheMismatch(ValueError):
    """A teacher cache folder was made for other data, another teacher, k or temperature."""


def _as_blocks(input_ids: Any) -> torch.Tensor:
    try:
        ids = as_token_blocks(input_ids)
    except ValueError as error:
        raise ValueError(f"input_ids must be a non-empty [blocks, block_size >= 2] array: {error}") from error
    if ids.shape[1] < 2:  # a block of one token predicts nothing
        raise ValueError(f"input_ids must be a non-empty [blocks, block_size >= 2] array, got shape {tuple(ids.shape)}")
    return ids


def _vocab_size(teacher: nn.Module) -> int:
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return teacher.config.vocab_size


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(folder / MANIFEST, manifest)


def _check_identity(folder: Path, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    differ = [name for name in _IDENTITY_FIELDS if found.get(name) != wanted[name]]
    if differ:
        detail = "; ".join(f"{name}: cache has {found.get(name)!r}, this run wants {wanted[name]!r}" for name in differ)
        raise TeacherCacheMismatch(
            f"the teacher cache in {folder} was made for other inputs ({detail}). "
            "Point to another folder, or delete this one to rebuild it."
        )


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.safetensors"


def reachable_blocks(blocks, count: int, seed: int = 0):
    """The `count` blocks a run of that many blocks reaches: the teacher runs once per cached block,
    so only those are cached. A seeded subset of a `datasets.Dataset` (the same on a resume, so the
    cache matches), or all of them when there are not more."""
    return blocks.shuffle(seed=seed).select(range(count)) if count < len(blocks) else blocks


@torch.no_grad()
def teacher_topk(
    teacher: nn.Module,
    input_ids: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities `[B, L, k]` (fp32), their token ids `[B, L, k]` (int64)
    and the log of the mass outside them `[B, L]` (fp32; -inf when k is the vocabulary size), all
    of the temperature-softened distribution `softmax(logits / temperature)`."""
    device = next(teacher.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with autocast:
        logits = teacher(input_ids=input_ids, attention_mask=attention_mask.to(device)).logits
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    del logits
    values, indices = logprobs.topk(k, dim=-1)
    # In place: the full log-probabilities are not needed after this, and they are the big tensor.
    rest = logprobs.scatter_(-1, indices, float("-inf")).logsumexp(-1)
    return values, indices, rest


def build_teacher_cache(
    teacher: nn.Module,
    input_ids: Any,
    cache_dir: str | Path,
    teacher_id: str,
    k: int = 64,
    temperature: float = 1.0,
    batch_size: int = CACHE_BATCH,
    blocks_per_shard: int = 256,
    dtype: torch.dtype = torch.float16,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> "TeacherCacheDataset":
    """Compute (or resume, or reuse) a teacher's top-k cache over fixed-length blocks of ids.

    Args:
        teacher: the softmax teacher (a causal LM); it runs where its parameters are.
        input_ids: `[blocks, block_size]` ids: a tensor, a list of lists, or a `datasets.Dataset`
            with an `input_ids` column (e.g. `data.text_blocks(...)`). Blocks are unpadded.
        cache_dir: the folder; created if missing. If it already holds a complete cache with the
            same identity it is reused as is; a partial one is completed.
        teacher_id: a string naming the teacher (name or path and anything that changes its
            outputs); part of the identity, so a cache of another teacher is refused.
        k: tokens kept per position (1 ≤ k ≤ vocabulary size).
        temperature: the softening the log-probabilities are stored at; distill at the same one.
        batch_size: blocks per teacher forward (RAM ≈ batch_size × block_size × vocab × 8 bytes).
        blocks_per_shard: blocks per shard file (RAM of one shard ≈ blocks × block_size × k × 6 bytes).
        dtype: float16 (default: finer steps than bfloat16 on log-probabilities, whose range
            fits easily) or bfloat16, for the stored top-k values.
        autocast_dtype: e.g. `torch.bfloat16` to run the teacher under autocast (faster on CPUs
            with native bf16); the soft-max and top-k are always fp32.
        progress: show a tqdm bar (blocks, with ETA).

    Returns:
        A `TeacherCacheDataset` over the folder. Raises `TeacherCacheMismatch` if the folder was
        made for other ids, teacher, k or temperature.
    """
    from transformers.utils.logging import tqdm

    ids = _as_blocks(input_ids)
    vocab = _vocab_size(teacher)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the teacher's vocabulary), got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1 or blocks_per_shard < 1:
        raise ValueError(f"batch_size and blocks_per_shard must be >= 1, got {batch_size} and {blocks_per_shard}")
    if dtype not in _VALUE_DTYPES.values():
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {
        "format": FORMAT_VERSION,
        "teacher": teacher_id,
        "k": k,
        "temperature": float(temperature),
        "block_size": ids.shape[1],
        "num_blocks": ids.shape[0],
        "token_hash": token_hash(ids),
    }
    found = _read_manifest(folder)
    if found is not None:
        _check_identity(folder, found, wanted)
        if found.get("complete"):
            return TeacherCacheDataset(folder)
        # The storage layout of a partial cache wins, so its finished shards stay valid.
        blocks_per_shard, dtype = found["blocks_per_shard"], _VALUE_DTYPES[found["dtype"]]
    manifest = {
        **wanted,
        "vocab_size": vocab,
        "dtype": str(dtype).removeprefix("torch."),
        "blocks_per_shard": blocks_per_shard,
        "teacher_autocast": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
        "complete": False,
    }
    _write_manifest(folder, manifest)

    shards = math.ceil(len(ids) / blocks_per_shard)
    todo = [s for s in range(shards) if not _shard_path(folder, s).exists()]
    done_blocks = len(ids) - sum(len(ids[s * blocks_per_shard : (s + 1) * blocks_per_shard]) for s in todo)
    was_training = teacher.training
    teacher.eval()
    with tqdm(total=len(ids), initial=done_blocks, desc="teacher top-k cache", unit="block", disable=not progress) as bar:
        for shard in todo:
            shard_ids = ids[shard * blocks_per_shard : (shard + 1) * blocks_per_shard]
            parts: dict[str, list[torch.Tensor]] = {"values": [], "indices": [], "rest": []}
            for batch in shard_ids.split(batch_size):
                values, indices, rest = teacher_topk(teacher, batch, k, temperature, autocast_dtype=autocast_dtype)
                parts["values"].append(values.to(dtype).cpu())
                parts["indices"].append(indices.to(torch.int32).cpu())
                parts["rest"].append(rest.cpu())
                bar.update(len(batch))
            tensors = {
                "input_ids": shard_ids.to(torch.int32).contiguous(),
                "topk_logprobs": torch.cat(parts["values"]).contiguous(),
                "topk_indices": torch.cat(parts["indices"]).contiguous(),
                "rest_logprob": torch.cat(parts["rest"]).contiguous(),
            }
            save_tensors_atomic(tensors, _shard_path(folder, shard))  # a shard file on disk is always whole
    teacher.train(was_training)
    _write_manifest(folder, {**manifest, "complete": True})
    return TeacherCacheDataset(folder)


class TeacherCacheDataset(torch.utils.data.Dataset):
    """The blocks of a complete teacher cache, for `Trainer` (or any `DataLoader`).

    Item `i` is a dict: `input_ids`, `attention_mask` (ones) and `labels` (the ids) as int64
    `[block_size]`, and the cached targets `teacher_topk_logprobs` (float16/bfloat16
    `[block_size, k]`), `teacher_topk_indices` (int32 `[block_size, k]`) and
    `teacher_rest_logprob` (float32 `[block_size]`), which `DistillationTrainer` takes in place
    of a live teacher. Shards are read lazily (memory-mapped), so RAM stays small.

    Args:
        cache_dir: a folder written by `build_teacher_cache`.
        teacher_id / input_ids / k / temperature: if given, checked against the manifest
            (`TeacherCacheMismatch` when they differ), as `build_teacher_cache` would.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        teacher_id: str | None = None,
        input_ids: Any = None,
        k: int | None = None,
        temperature: float | None = None,
    ):
        self.folder = Path(cache_dir)
        manifest = _read_manifest(self.folder)
        if manifest is None:
            raise FileNotFoundError(f"{self.folder} holds no teacher cache ({MANIFEST} is missing)")
        if not manifest.get("complete"):
            raise ValueError(f"the teacher cache in {self.folder} is incomplete: run build_teacher_cache to finish it")
        expected = {"teacher": teacher_id, "k": k, "temperature": None if temperature is None else float(temperature)}
        if input_ids is not None:
            ids = _as_blocks(input_ids)
            expected.update(block_size=ids.shape[1], num_blocks=ids.shape[0], token_hash=token_hash(ids))
        expected = {name: value for name, value in expected.items() if value is not None}
        _check_identity(self.folder, manifest, {**{n: manifest.get(n) for n in _IDENTITY_FIELDS}, **expected})
        self.manifest = manifest
        self._handles: dict[int, Any] = {}

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    @property
    def block_size(self) -> int:
        return self.manifest["block_size"]

    def __len__(self) -> int:
        return self.manifest["num_blocks"]

    def _shard(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(_shard_path(self.folder, shard)), framework="pt")
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"block {index} of a cache of {len(self)}")
        index %= len(self)
        shard, row = divmod(index, self.manifest["blocks_per_shard"])
        handle = self._shard(shard)
        ids = handle.get_slice("input_ids")[row].to(torch.int64)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids.clone(),
            TOPK_LOGPROBS: handle.get_slice("topk_logprobs")[row],
            TOPK_INDICES: handle.get_slice("topk_indices")[row],
            REST_LOGPROB: handle.get_slice("rest_logprob")[row],
        }

    def __getstate__(self) -> dict[str, Any]:
        # Open safetensors handles do not pickle (DataLoader workers); each process reopens its own.
        return {**self.__dict__, "_handles": {}}

