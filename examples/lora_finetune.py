"""Fine-tune a saved PolyAttn model with PEFT LoRA on the attention projections, then merge.

    python examples/lora_finetune.py --model runs/tiny-polyattn --text my_text.txt --out runs/tiny-lora

LoRA targets q/k/v/o_proj by default (hf_polyattn registers that default with peft). Saves the
adapter to --out/adapter and the merged model (+ tokenizer) to --out/merged.
"""

import argparse
import math
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import hf_polyattn  # noqa: F401  (registers PolyAttn with transformers and peft)
from hf_polyattn.training.corpora import read_texts
from hf_polyattn.training.data import text_blocks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a saved PolyAttn model folder with tokenizer")
    parser.add_argument("--text", nargs="*", type=Path, help="text files (default: the last Shakespeare titles)")
    parser.add_argument("--out", type=Path, default=Path("runs/polyattn-lora"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = read_texts(args.text) if args.text else read_texts()[-5:]
    dataset = text_blocks(tokenizer, texts, args.block).train_test_split(test_size=0.1, seed=0)

    base = AutoModelForCausalLM.from_pretrained(args.model)
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    training_args = TrainingArguments(
        output_dir=str(args.out / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        learning_rate=args.lr,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset["train"], eval_dataset=dataset["test"])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"held-out perplexity: {math.exp(before):.1f} -> {math.exp(after):.1f}")

    model.save_pretrained(args.out / "adapter")
    merged = AutoPeftModelForCausalLM.from_pretrained(args.out / "adapter").merge_and_unload()
    merged.save_pretrained(args.out / "merged")
    tokenizer.save_pretrained(args.out / "merged")
    print(f"adapter: {args.out / 'adapter'}  merged model: {args.out / 'merged'}")


if __name__ == "__main__":
    main()
