"""Attention transfer: recording lines up with the converted student, training lowers each layer's
error and the model's KL, a resumed run ends with the same weights, and mismatches are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_polyattn.cli import main as cli_main
from hf_polyattn.conversion.convert import convert_checkpoint
from hf_polyattn.training.attention_transfer import read_manifest, record_teacher, transfer_attention
from hf_polyattn.training.distill import distillation_kl
from tests.conversion.test_convert_and_distill import tiny_llama
from tests.conversion.test_families import build
from tests.helpers import random_ids, save_tiny_llama

ATTENTION = dict(attn_power=4, attn_eps=1e-6, attn_form="sum")
FAST = dict(batch_size=4, progress=False)


def _kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(distillation_kl(student(ids).logits, teacher(ids).logits))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny Llama teacher and its recording on 64 blocks of 32 tokens (in 4 shards)."""
    teacher = tiny_llama()
    folder = tmp_path_factory.mktemp("record")
    record_teacher(teacher, random_ids(64, 32), folder, name="tiny", shard_tokens=512, progress=False)
    return teacher, folder


def test_recording_holds_each_layers_attention_input_and_output(recorded, tmp_path):
    teacher, folder = recorded
    manifest = read_manifest(folder)
    assert (manifest["tokens"], manifest["block_size"], manifest["shards"], manifest["layers"]) == (2048, 32, 4, 2)
    shard = load_file(str(folder / "layer_000" / "shard_00000.safetensors"))
    assert shard["inputs"].dtype == torch.bfloat16 and shard["inputs"].shape == (16, 32, 32)
    ids = random_ids(64, 32)[:16]
    layer = teacher.model.layers[0]
    with torch.no_grad():
        hidden = layer.input_layernorm(teacher.model.embed_tokens(ids))
        positions = teacher.model.rotary_emb(hidden, torch.arange(32)[None])
        output = layer.self_attn(hidden_states=hidden, position_embeddings=positions, attention_mask=None)[0]
    torch.testing.assert_close(shard["inputs"].float(), hidden, atol=0, rtol=1 / 128)
    torch.testing.assert_close(shard["targets"].float(), output, atol=1e-3, rtol=1 / 128)
    # a second call finds it complete and does nothing; another teacher is refused
    assert record_teacher(teacher, random_ids(64, 32), folder, shard_tokens=512, progress=False) == manifest
    with pytest.raises(ValueError, match="teacher: .* holds a recording of tiny"):
        record_teacher(tiny_llama(seed=1), random_ids(64, 32), folder, shard_tokens=512, progress=False)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        transfer_attention(convert_checkpoint(teacher, **ATTENTION), tmp_path, tmp_path / "out", **FAST)


def test_an_interrupted_recording_resumes_with_the_same_shards(recorded, tmp_path):
    teacher, folder = recorded
    batches = []

    def interrupt(module, args, output):
        batches.append(1)
        if len(batches) == 10:  # in the third shard of four
            raise KeyboardInterrupt

    handle = teacher.model.layers[0].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            record_teacher(teacher, random_ids(64, 32), tmp_path, name="tiny", shard_tokens=512, progress=False)
    finally:
        handle.remove()
    assert json.loads((tmp_path / "manifest.json").read_text())["shards_done"] == 2
    with pytest.raises(ValueError, match="unfinished .2 of 4 shards"):
        read_manifest(tmp_path)
    record_teacher(teacher, random_ids(64, 32), tmp_path, name="tiny", shard_tokens=512, progress=False)
    assert read_manifest(tmp_path) == read_manifest(folder)
    for layer in range(2):
        for shard in range(4):
            name = f"layer_{layer:03d}/shard_{shard:05d}.safetensors"
            assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name


@pytest.mark.parametrize("name", ["llama", "gpt_neox_parallel", "gpt2", "gemma3"])
@pytest.mark.parametrize("inputs", ["teacher", "student"])
def test_a_power_softmax_teacher_is_reproduced_exactly_by_its_student(tmp_path, name, inputs):
    """The stock class run with Power-Softmax is the converted model: every layer's recorded output is
    then the student's own, up to bf16 rounding, whatever the layout (parallel residual, learned
    positions, per-layer RoPE bases, sandwich norms) and in both input modes."""
    teacher = build(name)
    student = convert_checkpoint(teacher, **ATTENTION)
    teacher.config.update(ATTENTION)
    teacher.set_attn_implementation("power_softmax")
    record_teacher(teacher, random_ids(8, 16), tmp_path / "record", progress=False)
    report = transfer_attention(student, tmp_path / "record", tmp_path / "out", lr=1e-12, inputs=inputs, **FAST)
    assert [entry["layer"] for entry in report] == [0, 1]
    assert all(entry["error_before"] < 1e-2 and entry["error_after"] < 1e-2 for entry in report), report


@pytest.mark.parametrize("inputs", ["teacher", "student"])
def test_transfer_lowers_each_layers_error_and_the_kl(recorded, tmp_path, inputs):
    teacher, folder = recorded
    student = convert_checkpoint(teacher, **ATTENTION)
    held_out = random_ids(8, 32, seed=99)
    before = _kl(student, teacher, held_out)
    report = transfer_attention(student, folder, tmp_path, epochs=3, inputs=inputs, **FAST)
    assert all(entry["error_after"] < 0.8 * entry["error_before"] for entry in report), report
    assert _kl(student, teacher, held_out) < 0.85 * before
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["layers"] == [{k: v for k, v in e.items() if k != "resumed"} for e in report]
    assert state["settings"]["inputs"] == inputs and not any(e["resumed"] for e in report)
    trained = load_file(str(tmp_path / "layer_001.safetensors"))
    assert set(trained) == {f"{p}_proj.weight" for p in "qkvo"}
    assert torch.equal(trained["k_proj.weight"], student.model.layers[1].self_attn.k_proj.weight)


@pytest.mark.parametrize("inputs", ["teacher", "student"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(recorded, tmp_path, inputs):
    teacher, folder = recorded
    whole = convert_checkpoint(teacher, **ATTENTION)
    full_report = transfer_attention(whole, folder, tmp_path / "whole", inputs=inputs, **FAST)

    interrupted = convert_checkpoint(teacher, **ATTENTION)
    first = transfer_attention(interrupted, folder, tmp_path / "resumed", inputs=inputs, max_layers=1, **FAST)
    assert [entry["layer"] for entry in first] == [0]
    resumed = convert_checkpoint(teacher, **ATTENTION)  # a fresh process: only the checkpoints carry over
    report = transfer_attention(resumed, folder, tmp_path / "resumed", inputs=inputs, **FAST)
    assert report[0] == {**first[0], "resumed": True}  # layer 0 was not trained again
    assert [e["error_after"] for e in report] == [e["error_after"] for e in full_report]
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    # all done: a further call only loads the checkpoints
    again = convert_checkpoint(teacher, **ATTENTION)
    assert transfer_attention(again, folder, tmp_path / "resumed", inputs=inputs, **FAST) == [
        {**entry, "resumed": True} for entry in report
    ]
    assert torch.equal(again.model.layers[1].self_attn.q_proj.weight, whole.model.layers[1].self_attn.q_proj.weight)


def test_mismatched_resumes_and_recordings_are_refused_before_any_work(recorded, tmp_path):
    teacher, folder = recorded
    transfer_attention(convert_checkpoint(teacher, **ATTENTION), folder, tmp_path / "out", max_layers=1, **FAST)
    state = (tmp_path / "out" / "state.json").read_text()

    def refused(student, match, record=folder, **options):
        with pytest.raises(ValueError, match=match):
            transfer_attention(student, record, tmp_path / "out", **{**FAST, **options})
        assert (tmp_path / "out" / "state.json").read_text() == state
        assert not (tmp_path / "out" / "layer_001.safetensors").exists()

    six = convert_checkpoint(teacher, **{**ATTENTION, "attn_power": 6})
    refused(six, "attn_power: the checkpoint in .* was made with 4, this student has 6")
    mean = convert_checkpoint(teacher, **{**ATTENTION, "attn_form": "mean"})
    refused(mean, "attn_form: .* 'sum', this student has 'mean'")
    four = convert_checkpoint(teacher, **ATTENTION)
    refused(four, r"params: .* this run has \['q_proj', 'k_proj'\]", params=("q_proj", "k_proj"))
    refused(four, "inputs: .* 'teacher', this run has 'student'", inputs="student")

    other = tiny_llama(seed=1)
    record_teacher(other, random_ids(64, 32), tmp_path / "other", name="other", progress=False)
    refused(convert_checkpoint(other, **ATTENTION), "teacher: the checkpoint .* made with tiny .* recording is of other",
            record=tmp_path / "other")

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    refused(convert_checkpoint(wide, **ATTENTION), "hidden size: .* 32-wide hidden states, this student has hidden_size 64")


TEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 60


def test_transfer_from_the_command_line_resumes(tmp_path, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    save_tiny_llama(tmp_path / "llama", TEXT)
    assert cli_main(["convert", "--from", str(tmp_path / "llama"), "--out", str(tmp_path / "poly")]) == 0

    argv = ["transfer", "--teacher", str(tmp_path / "llama"), "--student", str(tmp_path / "poly"),
            "--out", str(tmp_path / "moved"), "--data", str(tmp_path / "text.txt"), "--tokens", "512",
            "--block", "32", "--epochs", "2", "--lr", "3e-3"]
    capsys.readouterr()
    assert cli_main(argv) == 0
    first = capsys.readouterr().out
    assert "layer   0" in first and "layer   1" in first
    assert read_manifest(tmp_path / "moved" / "record")["tokens"] == 512
    moved = AutoModelForCausalLM.from_pretrained(tmp_path / "moved")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "poly")
    v_proj = [model.model.layers[1].self_attn.v_proj.weight for model in (moved, converted)]
    assert not torch.equal(*v_proj)
    stamp = (tmp_path / "moved" / "transfer" / "state.json").stat().st_mtime_ns

    assert cli_main(argv) == 0  # the same command again: everything is on disk
    assert "all 2 layers were already transferred" in capsys.readouterr().out
    assert (tmp_path / "moved" / "transfer" / "state.json").stat().st_mtime_ns == stamp
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "moved")
    for name, tensor in moved.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
