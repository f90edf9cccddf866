"""Training a small PolyAttn model from scratch on local text with `Trainer`."""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments

from ..modeling import PolyAttnConfig, PolyAttnForCausalLM
from .data import text_blocks, train_byte_level_tokenizer


@dataclass
class PretrainResult:
    model: PolyAttnForCausalLM
    tokenizer: PreTrainedTokenizerFast
    eval_blocks: list[list[int]]
    perplexity_before: float
    perplexity_after: float


def split_text(texts: list[str], held_out: float = 0.05) -> tuple[str, str]:
    """One joined text cut into a training head and a held-out tail (never trained on)."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    joined = "\n".join(texts)
    split = int(len(joined) * (1 - held_out))
    return joined[:split], joined[split:]


def pretrain(
    texts: list[str],
    output_dir: str | Path,
    steps: int = 300,
    vocab_size: int = 2048,
    block_size: int = 128,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    **config_fields,
) -> PretrainResult:
    """Train a byte-level BPE tokenizer and a PolyAttn model from scratch on `texts`.

    `config_fields` go to `PolyAttnConfig` (defaults: d=128, 4 layers, 4 heads, 2 KV heads,
    p=4, tied embeddings). Reports held-out perplexity before and after training; saves nothing.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    train_text, eval_text = split_text(texts)
    tokenizer = train_byte_level_tokenizer([train_text], vocab_size=vocab_size)
    train_set = text_blocks(tokenizer, [train_text], block_size)
    eval_set = text_blocks(tokenizer, [eval_text], block_size)
    hidden = config_fields.pop("hidden_size", 128)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(512, block_size),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    fields.update(config_fields)
    model = PolyAttnForCausalLM(PolyAttnConfig(**fields))
    curve = train_language_model(
        model, train_set, eval_set, output_dir, steps, batch_size, learning_rate, seed=seed, progress=progress
    ).eval_loss
    model.eval()
    return PretrainResult(model, tokenizer, eval_set["input_ids"], math.exp(curve[0][1]), math.exp(curve[-1][1]))


@dataclass
class TrainingHistory:
    """What a training run logged, as `(step, value)` pairs."""

    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    grad_norm: list[tuple[int, float]] = field(default_factory=list)


class _HistoryRecorder(TrainerCallback):
    def __init__(self):
        self.history = TrainingHistory()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.history.eval_loss.append((state.global_step, metrics["eval_loss"]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        for name in ("loss", "grad_norm"):
            if logs and name in logs:
                series = self.history.train_loss if name == "loss" else self.history.grad_norm
                series.append((state.global_step, float(logs[name])))


def train_language_model(
    model: PreTrainedModel,
    train_set,
    eval_set,
    output_dir: str | Path,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 2e-3,
    eval_every: int | None = None,
    seed: int = 0,
    progress: bool = True,
    **training_arguments,
) -> TrainingHistory:
    """Train any causal LM from its current weights with `Trainer` (AdamW, cosine, 5 % warm-up).

    The data order depends on `seed` only, so two models trained with the same sets, steps and
    seed see the same tokens in the same order. Returns the held-out loss curve
    `[(step, eval_loss), …]`: before training, every `eval_every` steps, and at the end.
    `training_arguments` override the `TrainingArguments` (e.g. `bf16=True`,
    `gradient_checkpointing=True`).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    fields = dict(
        output_dir=str(Path(output_dir) / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.01,
        logging_steps=max(1, steps // 10),
        eval_strategy="steps" if eval_every else "no",
        eval_steps=eval_every,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress,
        seed=seed,
        data_seed=seed,
    )
    fields.update(training_arguments)
    recorder = _HistoryRecorder()
    trainer = Trainer(
        model=model, args=TrainingArguments(**fields), train_dataset=train_set, eval_dataset=eval_set,
        callbacks=[recorder],
    )
    trainer.evaluate()
    trainer.train()
    if recorder.history.eval_loss[-1][0] != trainer.state.global_step:
        trainer.evaluate()
    # The curve is measured under the training's precision throughout; the model goes back with its
    # own forward, not accelerate's autocast wrapper (see training/autocast.py).
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return recorder.history
