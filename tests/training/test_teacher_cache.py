"""The teacher's top-k cache: what it stores, how it refuses a mismatch, how it resumes."""

import json

import pytest
import torch

from hf_polyattn.training.teacher_cache import (
    REST_LOGPROB,
    TOPK_INDICES,
    TOPK_LOGPROBS,
    TeacherCacheDataset,
    TeacherCacheMismatch,
    build_teacher_cache,
    teacher_topk,
)
from tests.conversion.test_convert_and_distill import tiny_llama
from tests.helpers import VOCAB, random_ids


def _build(teacher, ids, folder, **options):
    options = {"teacher_id": "tiny-llama", "k": 8, "batch_size": 3, "blocks_per_shard": 4, "progress": False, **options}
    return build_teacher_cache(teacher, ids, folder, **options)


def test_cache_round_trip(tmp_path):
    teacher, ids = tiny_llama(), random_ids(10, 16)
    cache = _build(teacher, ids, tmp_path, temperature=2.0)
    assert len(cache) == 10 and cache.k == 8 and cache.block_size == 16 and cache.temperature == 2.0
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 3
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(ids).logits / 2.0, dim=-1)
    values, indices = logprobs.topk(8, dim=-1)
    rest = logprobs.scatter(-1, indices, float("-inf")).logsumexp(-1)
    for i in (0, 3, 4, 9, -1):
        item = cache[i]
        assert torch.equal(item["input_ids"], ids[i]) and torch.equal(item["labels"], ids[i])
        assert torch.equal(item["attention_mask"], torch.ones(16, dtype=torch.int64))
        assert item[TOPK_LOGPROBS].dtype == torch.float16 and item[TOPK_INDICES].dtype == torch.int32
        assert torch.equal(item[TOPK_INDICES].long(), indices[i])
        torch.testing.assert_close(item[TOPK_LOGPROBS].float(), values[i], atol=1e-2, rtol=8e-3)  # bf16 tolerance
        torch.testing.assert_close(item[REST_LOGPROB], rest[i])
    with pytest.raises(IndexError):
        cache[10]
    # teacher_topk is the same computation; with k = vocabulary size nothing is left over.
    _, _, none_left = teacher_topk(teacher, ids[:2], VOCAB)
    assert torch.isneginf(none_left).all()


def test_a_complete_cache_is_reused_and_a_mismatch_refused(tmp_path):
    teacher, ids = tiny_llama(), random_ids(6, 16)
    _build(teacher, ids, tmp_path)
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")}
    again = _build(tiny_llama(seed=1), ids, tmp_path)  # same identity string: reused, not recomputed
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*")} == stamp and len(again) == 6
    for change, field in [
        (dict(input_ids=random_ids(6, 16, seed=2)), "token_hash"),
        (dict(input_ids=random_ids(5, 16)), "num_blocks"),
        (dict(k=4), "k"),
        (dict(teacher_id="another-teacher"), "teacher"),
        (dict(temperature=2.0), "temperature"),
    ]:
        with pytest.raises(TeacherCacheMismatch, match=f"{field}: cache has .*this run wants"):
            _build(teacher, change.get("input_ids", ids), tmp_path, **{k: v for k, v in change.items() if k != "input_ids"})
        with pytest.raises(TeacherCacheMismatch, match=field):
            TeacherCacheDataset(tmp_path, **change)
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        TeacherCacheDataset(tmp_path / "nothing")


def test_an_interrupted_build_resumes(tmp_path):
    teacher, ids = tiny_llama(), random_ids(10, 16)
    full = _build(teacher, ids, tmp_path / "full")
    _build(teacher, ids, tmp_path / "part")
    manifest = json.loads((tmp_path / "part" / "manifest.json").read_text())
    (tmp_path / "part" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (tmp_path / "part" / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCacheDataset(tmp_path / "part")
    kept = (tmp_path / "part" / "shard-00000.safetensors").stat().st_mtime_ns
    resumed = _build(teacher, ids, tmp_path / "part")
    assert (tmp_path / "part" / "shard-00000.safetensors").stat().st_mtime_ns == kept
    for i in range(10):
        assert all(torch.equal(resumed[i][key], full[i][key]) for key in full[i])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="k must be in"):
        _build(tiny_llama(), random_ids(2, 8), tmp_path, k=VOCAB + 1)
    with pytest.raises(ValueError, match="block_size >= 2"):
        _build(tiny_llama(), random_ids(2, 8)[:, 0], tmp_path)
