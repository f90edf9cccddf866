"""Llama-family checkpoints convert by a lossless copy; distillation lowers the KL to the teacher."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainingArguments

from hf_polyattn import PolyAttnForCausalLM
from hf_polyattn.conversion.convert import convert_checkpoint
from hf_polyattn.conversion.distill import DistillationTrainer, distillation_kl
from tests.helpers import left_padded_batch, random_ids

ATTENTION = dict(attn_power=4, attn_eps=1e-6, attn_form="sum")


def tiny_llama(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.15, tie_word_embeddings=tie, pad_token_id=0, rope_theta=5000.0,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_weight_map_loses_nothing_and_matches_stock_power_softmax(tie):
    source = tiny_llama(tie)
    converted = convert_checkpoint(source, **ATTENTION)
    assert isinstance(converted, PolyAttnForCausalLM)
    assert converted.config.rope_parameters == source.config.rope_parameters
    ids, mask = left_padded_batch([9, 6])
    with torch.no_grad():
        reference = source(ids, attention_mask=mask).logits
        # converted weights back in the stock class: the source logits, exactly
        back = LlamaForCausalLM(copy.deepcopy(source.config)).eval()
        back.load_state_dict(converted.state_dict())
        assert torch.equal(back(ids, attention_mask=mask).logits, reference)
        # the stock class with Power-Softmax is the PolyAttn model
        back.config.update(ATTENTION)
        back.set_attn_implementation("power_softmax")
        assert torch.equal(back(ids, attention_mask=mask).logits, converted(ids, attention_mask=mask).logits)


def test_unknown_architecture_lists_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported source architectures are llama, mistral"):
        convert_checkpoint(gpt2)


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
