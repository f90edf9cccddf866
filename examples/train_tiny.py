"""Train a tiny PolyAttn language model from scratch on local text with `Trainer` (CPU, minutes).

    python examples/train_tiny.py --out runs/tiny-polyattn            # Shakespeare, from the registry
    python examples/train_tiny.py --text notes.txt --steps 100         # your own text files
    hf-polyattn generate --model runs/tiny-polyattn "ROMEO."

Prints held-out perplexity before and after training, saves model + tokenizer to --out.
"""

import argparse
import math
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from hf_polyattn import PolyAttnConfig, PolyAttnForCausalLM
from hf_polyattn.conversion.corpora import shakespeare_texts
from hf_polyattn.conversion.data import text_blocks, train_byte_level_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", nargs="*", type=Path, help="text files (default: the Shakespeare corpus)")
    parser.add_argument("--out", type=Path, default=Path("runs/tiny-polyattn"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--power", type=int, default=4, help="the even Power-Softmax power p")
    parser.add_argument("--form", choices=["sum", "mean"], default="sum")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    texts = [p.read_text(encoding="utf-8") for p in args.text] if args.text else list(shakespeare_texts().values())
    # Hold out the tail of the text for evaluation (never trained on).
    joined = "\n".join(texts)
    split = int(len(joined) * 0.95)
    train_text, eval_text = joined[:split], joined[split:]

    tokenizer = train_byte_level_tokenizer([train_text], vocab_size=args.vocab)
    train_set = text_blocks(tokenizer, [train_text], args.block)
    eval_set = text_blocks(tokenizer, [eval_text], args.block)
    config = PolyAttnConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(512, args.block),
        attn_power=args.power,
        attn_form=args.form,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = PolyAttnForCausalLM(config)
    print(f"PolyAttn p={args.power} ({args.form}): {model.num_parameters() / 1e6:.2f}M parameters, "
          f"{len(train_set)} train / {len(eval_set)} held-out blocks of {args.block} tokens")

    training_args = TrainingArguments(
        output_dir=str(args.out / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.01,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out perplexity: {math.exp(before):.1f} before -> {math.exp(after):.1f} after {args.steps} steps")

    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
