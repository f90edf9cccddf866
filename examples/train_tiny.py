"""Train a tiny PolyAttn language model from scratch on local text with `Trainer` (CPU, minutes).

    python examples/train_tiny.py --out runs/tiny-polyattn            # Shakespeare, from the registry
    python examples/train_tiny.py --text notes.txt --steps 100         # your own text files
    hf-polyattn generate --model runs/tiny-polyattn "ROMEO."
    accelerate launch --cpu --num_processes 2 examples/train_tiny.py --out runs/tiny-polyattn   # 2 processes (gloo)

Prints held-out perplexity before and after training, saves model + tokenizer to --out.
"""

import argparse
from pathlib import Path

from accelerate import PartialState

from hf_polyattn.training.corpora import read_texts
from hf_polyattn.training.pretrain import pretrain


def main(argv=None) -> Path:
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
    args = parser.parse_args(argv)

    texts = read_texts(args.text)
    result = pretrain(
        texts,
        args.out,
        steps=args.steps,
        vocab_size=args.vocab,
        block_size=args.block,
        batch_size=args.batch,
        learning_rate=args.lr,
        seed=args.seed,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        attn_power=args.power,
        attn_form=args.form,
    )
    state = PartialState()  # one process, or one of `accelerate launch`'s (Trainer synchronised them)
    print(f"rank {state.process_index}/{state.num_processes}: trained {args.steps} steps on {state.device}")
    if state.is_main_process:
        print(
            f"PolyAttn p={args.power} ({args.form}), {result.model.num_parameters() / 1e6:.2f}M parameters: "
            f"held-out perplexity {result.perplexity_before:.1f} before -> {result.perplexity_after:.1f} "
            f"after {args.steps} steps"
        )
        result.model.save_pretrained(args.out)
        result.tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}")
    state.wait_for_everyone()
    return args.out


if __name__ == "__main__":
    main()
