"""Distillation lowers a converted student's KL to its softmax teacher (the weight maps: test_families.py)."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from hf_polyattn.conversion.convert import convert_checkpoint
from hf_polyattn.training.distill import DistillationTrainer, distillation_kl
from tests.helpers import random_ids

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


def _held_out_kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(distillation_kl(student(ids).logits, teacher(ids).logits))


def _distill(student, teacher, tmp_path, steps=80, **weights):
    dataset = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in random_ids(640, 16)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=10, seed=0,
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
