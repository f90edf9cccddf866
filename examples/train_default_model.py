"""Train the embedded default model that ships inside the package (`hf_polyattn/default_model/`).

    python examples/train_default_model.py                 # rewrites hf_polyattn/default_model/
    python examples/train_default_model.py --out /tmp/m     # somewhere else
    python examples/train_default_model.py --recalibrate    # same weights, today's approximations

A 2-layer, d=64 PolyAttn model (p=4) trained on the Shakespeare corpus with `Trainer` on the
CPU (a few minutes), calibrated on held-out text and saved in its polynomial form with its
tokenizer: small enough that encrypted generation of ~20 tokens runs on a 2-core CPU in minutes.
`attn_eps` is larger than the library default so the attention normaliser's 1/x spans a range a
small CKKS ring holds with few Goldschmidt iterations.
"""

import argparse
import json
import tempfile
from pathlib import Path

from hf_polyattn.ckks import fit_to_ring
from hf_polyattn.training.calibrate import calibrate
from hf_polyattn.training.corpora import read_texts
from hf_polyattn.training.pretrain import pretrain, split_text
from hf_polyattn.assets import DEFAULT_MODEL_DIR, load_default_model


MAX_BLOCK_DEPTH = 40


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", nargs="*", type=Path, help="text files (default: the Shakespeare corpus)")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--eps", type=float, default=1e-2, help="attn_eps of the power-softmax normaliser")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--recalibrate", action="store_true",
        help="keep the shipped weights; only choose the approximations again (after the defaults change)",
    )
    args = parser.parse_args(argv)

    texts = read_texts(args.text)
    if args.recalibrate:
        model, tokenizer = load_default_model()
        model.to_exact()
    else:
        with tempfile.TemporaryDirectory() as scratch:
            result = _train(texts, scratch, args)
        print(
            f"{result.model.num_parameters() / 1e6:.2f}M parameters: held-out perplexity "
            f"{result.perplexity_before:.1f} -> {result.perplexity_after:.1f} after {args.steps} steps"
        )
        model, tokenizer = result.model, result.tokenizer
    _, held_out = split_text(texts)
    calibrate(model, tokenizer, [held_out], block_size=128, num_blocks=64)
    # the fewest refreshes on the default ring, each block within 40 levels (the depth it had)
    fit_to_ring(model, max_block_depth=MAX_BLOCK_DEPTH)
    print(model.polynomial_report(as_text=True))
    _save_without_code(model, args.out)
    if not args.recalibrate:  # a re-saved tokenizer only gains loader noise
        tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")
    return args.out


def _save_without_code(model, folder: Path) -> None:
    """Save the weights and config only: the package that ships this folder is its code (a copy
    of `modeling/` inside the package would be a second one to keep in step)."""
    model.save_pretrained(folder)
    for copied in Path(folder).glob("*.py"):
        copied.unlink()
    config = json.loads((Path(folder) / "config.json").read_text())
    config.pop("auto_map", None)
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _train(texts, scratch, args):
    return pretrain(
        texts,
        scratch,
        steps=args.steps,
        vocab_size=512,
        block_size=128,
        batch_size=16,
        learning_rate=3e-3,
        seed=args.seed,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_power=4,
        attn_eps=args.eps,
    )


if __name__ == "__main__":
    main()
