"""A recovered model ships as an fp16 delta over its base checkpoint and rebuilds from it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_polyattn.conversion.checkpoints import load_checkpoint
from hf_polyattn.conversion.convert import convert_checkpoint
from hf_polyattn.conversion.delta import (
    DELTA_FILE, MANIFEST_FILE, add_delta, apply_delta, base_state, delta_tensors, save_delta, tied_names, weights_hash,
    write_delta,
)
from tests.helpers import random_ids, save_tiny_llama


def save_llama(folder, seed: int = 0) -> None:
    save_tiny_llama(folder, "the quick brown fox jumps over the lazy dog " * 40, seed=seed)


@pytest.fixture
def recovered(tmp_path):
    """A converted tiny Llama whose attention 'trained' (perturbed), in calibrated polynomial form."""
    save_llama(tmp_path / "base")
    teacher, _ = load_checkpoint(tmp_path / "base")
    model = convert_checkpoint(teacher, attn_power=4, attn_eps=1e-2)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.o_proj):
                projection.weight += 0.01 * torch.randn(projection.weight.shape, generator=generator)
    model.to_polynomial(calibration_data=[random_ids(4, 16, seed=s) for s in range(4)], progress=False)
    return model


def test_delta_keeps_only_what_changed_and_rebuilds_the_model(recovered, tmp_path):
    manifest = write_delta(recovered, str(tmp_path / "base"), tmp_path / "delta")
    stored = load_file(tmp_path / "delta" / DELTA_FILE)
    assert sorted(stored) == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qo")
    assert all(t.dtype == torch.float16 for t in stored.values()) and manifest["tensors"] == 4

    rebuilt, tokenizer = apply_delta(tmp_path / "delta")
    loaded, _ = load_checkpoint(tmp_path / "delta")  # a delta folder is a checkpoint like any other
    assert all(torch.equal(t, loaded.state_dict()[n]) for n, t in rebuilt.state_dict().items())
    assert rebuilt.is_polynomial and rebuilt.config.polynomial == recovered.config.polynomial
    ids = random_ids(2, 12, seed=7)
    with torch.no_grad():
        expected = recovered(ids).logits
        # the changes are stored in fp16: the rebuilt logits move by its rounding, not more
        assert (rebuilt(ids).logits - expected).abs().max() < 1e-3 * expected.abs().max()
    assert len(tokenizer) == recovered.config.vocab_size


def test_delta_refuses_a_size_over_the_limit_and_another_base(recovered, tmp_path):
    with pytest.raises(ValueError, match="over the 0 MiB limit: store low-rank changes"):
        write_delta(recovered, str(tmp_path / "base"), tmp_path / "delta", max_bytes=1000)
    assert not (tmp_path / "delta").exists()

    write_delta(recovered, str(tmp_path / "base"), tmp_path / "delta")
    save_llama(tmp_path / "other", seed=1)
    manifest = json.loads((tmp_path / "delta" / MANIFEST_FILE).read_text())
    (tmp_path / "delta" / MANIFEST_FILE).write_text(json.dumps({**manifest, "base": str(tmp_path / "other")}))
    with pytest.raises(ValueError, match="has weights hash .* was made against"):
        apply_delta(tmp_path / "delta")


def test_a_low_rank_delta_stores_factors_and_rebuilds_what_add_delta_gives(tmp_path):
    """SmolLM2's case: every parameter trained and the embedding tied to the LM head."""
    save_tiny_llama(tmp_path / "base", "the quick brown fox jumps over the lazy dog " * 40, tie_word_embeddings=True)
    teacher, _ = load_checkpoint(tmp_path / "base")
    model = convert_checkpoint(teacher, attn_power=4, attn_eps=1e-2)
    reference = base_state(model.config, str(tmp_path / "base"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter += 0.01 * torch.randn(parameter.shape, generator=generator)
    stored = delta_tensors(model.state_dict(), reference, rank=2, tied=tied_names(model))

    embedding = "model.embed_tokens.weight"
    assert stored[embedding + ".delta_left"].shape == (model.config.vocab_size, 2)
    assert stored[embedding + ".delta_right"].shape == (2, model.config.hidden_size)
    assert not any(name.startswith("lm_head") for name in stored)  # it is the embedding
    assert stored["model.norm.weight"].shape == (model.config.hidden_size,)  # vectors stay whole

    expected = add_delta(reference, stored)
    change = expected[embedding] - reference[embedding]
    assert torch.linalg.matrix_rank(change) == 2
    save_delta(stored, model.config, str(tmp_path / "base"), weights_hash(reference), tmp_path / "delta")
    assert sorted(p.name for p in (tmp_path / "delta").iterdir()) == sorted(["config.json", DELTA_FILE, MANIFEST_FILE])
    rebuilt, _ = apply_delta(tmp_path / "delta")
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, expected[embedding] if name == "lm_head.weight" else expected[name]), name
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.model.embed_tokens.weight.data_ptr()
