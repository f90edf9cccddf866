"""Training a PolyAttn model with `Trainer`, and LoRA through peft."""

import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_polyattn import LORA_TARGET_MODULES
from hf_polyattn.training.data import text_blocks, train_byte_level_tokenizer
from tests.helpers import random_ids, tiny_model

TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 40,
    "To be, or not to be, that is the question. " * 40,
    "A stitch in time saves nine, and a penny saved is a penny earned. " * 40,
]


def _train(model, dataset, output_dir, steps, lr):
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_trainer_lowers_the_loss_on_local_text(tmp_path):
    tokenizer = train_byte_level_tokenizer(TEXT, vocab_size=300)
    dataset = text_blocks(tokenizer, TEXT, block_size=32)
    model = tiny_model(vocab_size=len(tokenizer), initializer_range=0.05).train()
    losses = _train(model, dataset, tmp_path, steps=40, lr=3e-3)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_lora_wraps_attention_trains_saves_reloads_and_merges(tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # records the path for the adapter config
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", init_lora_weights=False))
    wrapped = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(LORA_TARGET_MODULES)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    ids = random_ids(16, 24)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    losses = _train(model, dataset, tmp_path / "run", steps=15, lr=5e-3)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        with model.disable_adapter():
            assert (expected - model(ids).logits).abs().max() > 1e-3, "the adapter changed nothing"

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
