"""Distillation lowers a converted student's KL to its softmax teacher (the weight maps: test_families.py)."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from hf_polyattn import LORA_TARGET_MODULES, PolyAttnForCausalLM
from hf_polyattn.cli import main as cli_main
from hf_polyattn.conversion.convert import convert_checkpoint
from hf_polyattn.training.distill import DistillationTrainer, distillation_kl, select_trainable, topk_distillation_kl
from hf_polyattn.training.teacher_cache import build_teacher_cache
from tests.helpers import VOCAB, random_ids, save_tiny_llama

ATTENTION = dict(attn_power=4, attn_eps=1e-6, attn_form="sum")


def tiny_llama(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.15, tie_word_embeddings=tie, pad_token_id=0, rope_theta=5000.0,
    )
    return LlamaForCausalLM(config).eval()


def test_distillation_kl_matches_torch_kl_div():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    for temperature in (1.0, 2.0):
        expected = temperature**2 * F.kl_div(
            F.log_softmax(student / temperature, -1).flatten(0, 1),
            F.log_softmax(teacher / temperature, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        torch.testing.assert_close(distillation_kl(student, teacher, temperature), expected)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kept = distillation_kl(student[mask.bool()][None], teacher[mask.bool()][None])
    torch.testing.assert_close(distillation_kl(student, teacher, mask=mask), kept)
    # the hand-written backward against autograd through F.kl_div
    student.requires_grad_()
    expected = 4 * F.kl_div(F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True, reduction="none").sum(-1)
    expected = (expected * mask).sum() / mask.sum()
    got = distillation_kl(student, teacher, 2.0, mask)
    torch.testing.assert_close(torch.autograd.grad(got, student)[0], torch.autograd.grad(expected, student)[0])


def _held_out_kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(distillation_kl(student(ids).logits, teacher(ids).logits))


def _distill(student, teacher, tmp_path, steps=80, dataset=None, bf16=False, **weights):
    if dataset is None:
        dataset = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in random_ids(640, 16)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=10, seed=0, bf16=bf16,
    )
    trainer = DistillationTrainer(model=student, args=args, train_dataset=dataset, teacher=teacher, **weights)
    trainer.train()
    return trainer


@pytest.mark.parametrize("weights", [dict(), dict(hidden_weight=0.5, lm_weight=0.1, temperature=2.0)])
def test_distillation_lowers_the_kl_to_the_teacher(tmp_path, weights):
    teacher = tiny_llama()
    student = convert_checkpoint(teacher, **ATTENTION).train()
    held_out = random_ids(8, 16, seed=99)
    before = _held_out_kl(student.eval(), teacher, held_out)
    trainer = _distill(student.train(), teacher, tmp_path, **weights)
    after = _held_out_kl(student.eval(), teacher, held_out)
    assert after < 0.7 * before, (before, after)
    logged = [log for log in trainer.state.log_history if "distill_kl" in log]
    assert logged and ("distill_hidden" in logged[0]) == ("hidden_weight" in weights)


def test_distillation_of_a_lora_student(tmp_path):
    teacher = tiny_llama()
    student = get_peft_model(convert_checkpoint(teacher, **ATTENTION), LoraConfig(r=8, task_type="CAUSAL_LM"))
    held_out = random_ids(8, 16, seed=99)
    before = _held_out_kl(student.eval(), teacher, held_out)
    _distill(student.train(), teacher, tmp_path, steps=30)
    assert _held_out_kl(student.eval(), teacher, held_out) < before
    assert all("lora_" in n for n, p in student.named_parameters() if p.requires_grad)


def test_distillation_rejects_bad_weights(tmp_path):
    teacher = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="temperature"):
        DistillationTrainer(model=convert_checkpoint(teacher), args=args, teacher=teacher, temperature=0.0)
    with pytest.raises(ValueError, match="at least one"):
        DistillationTrainer(model=convert_checkpoint(teacher), args=args, teacher=teacher, kl_weight=0.0)


def _topk(logits: torch.Tensor, k: int, temperature: float = 1.0):
    logprobs = F.log_softmax(logits / temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return values, indices, logprobs.scatter(-1, indices, float("-inf")).logsumexp(-1)


def test_topk_kl_over_the_whole_vocabulary_is_the_kl():
    student, teacher = torch.randn(2, 5, 11, requires_grad=True), 3 * torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for temperature in (1.0, 2.0):
        for m in (None, mask):
            values, indices, rest = _topk(teacher, 11, temperature)
            assert torch.isneginf(rest).all()
            expected = distillation_kl(student, teacher, temperature, m)
            (grad_expected,) = torch.autograd.grad(expected, student)
            for given_rest in (rest, None):
                got = topk_distillation_kl(student, values, indices.int(), given_rest, temperature, m)
                torch.testing.assert_close(got, expected)
                torch.testing.assert_close(torch.autograd.grad(got, student)[0], grad_expected)


def test_topk_kl_gradient_matches_autograd_below_the_vocabulary_size():
    """The hand-written backward against autograd through the same k + 1 bucket KL."""
    student, teacher = torch.randn(2, 5, 23, requires_grad=True), 3 * torch.randn(2, 5, 23)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for temperature, k in ((1.0, 1), (2.0, 6), (1.0, 22)):
        values, indices, rest = _topk(teacher, k, temperature)
        log_student = F.log_softmax(student / temperature, dim=-1)
        student_rest = log_student.scatter(-1, indices, float("-inf")).logsumexp(-1)
        per_token = (values.exp() * (values - log_student.gather(-1, indices))).sum(-1)
        per_token = per_token + rest.exp() * (rest - student_rest)
        expected = temperature**2 * (per_token * mask).sum() / mask.sum()
        got = topk_distillation_kl(student, values, indices, rest, temperature, mask)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(torch.autograd.grad(got, student)[0], torch.autograd.grad(expected, student)[0])


def test_topk_kl_is_close_for_a_peaked_teacher():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 16, VOCAB, generator=generator)
    teacher = torch.randn(4, 16, VOCAB, generator=generator)
    favourites = torch.randint(0, VOCAB, (4, 16, 3), generator=generator)
    teacher.scatter_add_(-1, favourites, torch.full((4, 16, 3), 8.0))  # a few likely tokens, as in an LM
    full = distillation_kl(student, teacher)
    values, indices, rest = _topk(teacher, 8)
    assert rest.exp().max() < 0.05
    torch.testing.assert_close(topk_distillation_kl(student, values, indices, rest), full, rtol=0.01, atol=0)
    # as stored: 16-bit values (the rest mass, kept in fp32, carries the tail)
    torch.testing.assert_close(topk_distillation_kl(student, values.half(), indices, rest), full, rtol=0.01, atol=0)
    assert topk_distillation_kl(student, values, indices, rest) <= full + 1e-6  # coarse-graining only loses KL


def test_distillation_from_a_teacher_cache_lowers_the_kl(tmp_path):
    teacher = tiny_llama()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3)  # peaked like a trained LM (top-16 of 97 hold ~90 %), not near uniform
    student = convert_checkpoint(teacher, **ATTENTION)
    cache = build_teacher_cache(teacher, random_ids(640, 16), tmp_path / "cache", "tiny-llama", k=16, progress=False)
    held_out = random_ids(8, 16, seed=99)
    before = _held_out_kl(student.eval(), teacher, held_out)
    trainer = _distill(student.train(), None, tmp_path, dataset=cache)
    after = _held_out_kl(student.eval(), teacher, held_out)
    assert after < 0.7 * before, (before, after)
    assert trainer.teacher is None and any("distill_kl" in log for log in trainer.state.log_history)


def test_cached_targets_need_no_hidden_term_and_the_same_temperature(tmp_path):
    teacher = tiny_llama()
    cache = build_teacher_cache(teacher, random_ids(8, 16), tmp_path / "cache", "tiny-llama", k=16, progress=False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    student = convert_checkpoint(teacher)
    with pytest.raises(ValueError, match="hidden_weight > 0 needs a live teacher"):
        DistillationTrainer(model=student, args=args, train_dataset=cache, hidden_weight=0.5)
    with pytest.raises(ValueError, match="temperature 1.0, but distillation asks for 2.0"):
        DistillationTrainer(model=student, args=args, train_dataset=cache, temperature=2.0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=[{"input_ids": random_ids(1, 16)[0]}])
    with pytest.raises(ValueError, match="no teacher"):
        trainer.compute_loss(student, {"input_ids": random_ids(2, 16)})


def test_attention_only_training_leaves_everything_else_unchanged(tmp_path):
    teacher = tiny_llama()
    student = select_trainable(convert_checkpoint(teacher, **ATTENTION), "attention")
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    trained = [name for name, p in student.named_parameters() if p.requires_grad]
    assert trained and all(name.split(".")[-2] in LORA_TARGET_MODULES for name in trained)
    _distill(student.train(), teacher, tmp_path, steps=5)
    for name, p in student.named_parameters():
        assert torch.equal(p, before[name]) != (name in trained), name
    with pytest.raises(ValueError, match="train must be one of"):
        select_trainable(student, "mlp")


def test_bf16_autocast_on_cpu(tmp_path):
    teacher = tiny_llama()
    student = convert_checkpoint(teacher, **ATTENTION)
    held_out = random_ids(8, 16, seed=99)
    before = _held_out_kl(student.eval(), teacher, held_out)
    seen = {}

    def record(who):
        def hook(module, args, output):
            seen.setdefault(who, output.dtype)

        return hook

    for who, model in (("student", student), ("teacher", teacher)):
        model.model.layers[0].self_attn.q_proj.register_forward_hook(record(who))
    _distill(student.train(), teacher, tmp_path, bf16=True)
    assert seen == {"student": torch.bfloat16, "teacher": torch.bfloat16}  # both really ran under autocast
    assert student.lm_head.weight.dtype == torch.float32  # the master weights stay fp32
    after = _held_out_kl(student.eval(), teacher, held_out)
    assert after < 0.7 * before, (before, after)
    # the trained model is handed back with its own forward: evaluated after training, it runs in
    # fp32, not silently under the autocast accelerate wrapped around it for training
    seen.clear()
    with torch.no_grad():
        logits = student(held_out).logits
    assert seen == {"student": torch.float32}
    torch.testing.assert_close(logits, type(student).forward(student, held_out).logits, rtol=0, atol=0)


def test_cached_lora_and_attention_distillation_from_the_command_line(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 50
    (tmp_path / "text.txt").write_text(text)
    save_tiny_llama(tmp_path / "llama", text, initializer_range=0.1)
    assert cli_main(["convert", "--from", str(tmp_path / "llama"), "--out", str(tmp_path / "poly")]) == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "poly").state_dict()
    common = ["distill", "--teacher", str(tmp_path / "llama"), "--student", str(tmp_path / "poly"),
              "--data", str(tmp_path / "text.txt"), "--steps", "4", "--batch-size", "4", "--block", "32",
              "--lr", "1e-3", "--teacher-cache", str(tmp_path / "cache"), "--topk", "8"]

    assert cli_main(common + ["--out", str(tmp_path / "lora"), "--train", "lora", "--no-bf16"]) == 0
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("shard-*")}
    assert shards
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    assert isinstance(merged, PolyAttnForCausalLM)
    moved = {n for n, t in merged.state_dict().items() if not torch.equal(t, converted[n])}
    assert moved and all(n.split(".")[-2] in LORA_TARGET_MODULES for n in moved), moved

    assert cli_main(common + ["--out", str(tmp_path / "attention"), "--train", "attention", "--bf16"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("shard-*")} == shards  # reused
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "attention").state_dict()
    moved = {n for n, t in state.items() if not torch.equal(t, converted[n])}
    assert moved and all(n.split(".")[-2] in LORA_TARGET_MODULES for n in moved), moved
    resume = ["--resume", str(tmp_path / "attention" / "checkpoints" / "checkpoint-2")]
    assert cli_main(common + ["--out", str(tmp_path / "attention"), "--train", "attention"] + resume) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("shard-*")} == shards  # reused on resume

    assert cli_main(common + ["--out", str(tmp_path / "hidden"), "--hidden-weight", "1"]) == 2


def test_cached_distillation_with_the_range_loss(tmp_path):
    teacher = tiny_llama()
    calibration = [random_ids(4, 16, seed=s) for s in range(4)]
    student = convert_checkpoint(teacher, **ATTENTION).to_polynomial(calibration_data=calibration, progress=False).to_exact()
    cache = build_teacher_cache(teacher, random_ids(64, 16), tmp_path / "cache", "tiny-llama", k=16, progress=False)
    trainer = _distill(student.train(), None, tmp_path, steps=10, dataset=cache, range_loss_weight=1.0)
    assert any("distill_range" in log and "distill_kl" in log for log in trainer.state.log_history)
