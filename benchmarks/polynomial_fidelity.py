"""What the fully polynomial form costs in accuracy: exact vs polynomial on held-out text.

    python benchmarks/polynomial_fidelity.py                      # trains tiny models on Shakespeare
    python benchmarks/polynomial_fidelity.py --model runs/tiny-polyattn --text my.txt

For each model: calibrate on training text, then compare exact and polynomial forms on held-out
blocks (perplexity, next-token top-1 agreement, |Δlogit|) for several approximation settings,
with the multiplicative depth each costs. Prints a Markdown table and writes it to --results.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_polyattn.training.calibrate import calibration_batches
from hf_polyattn.training.corpora import read_texts
from hf_polyattn.training.data import text_blocks
from hf_polyattn.training.pretrain import pretrain, split_text
from hf_polyattn.evaluation.fidelity import polynomial_fidelity
from report import command_line, write_results

SETTINGS = {
    "default (tol 1e-3, act deg 16)": {},
    "tol 1e-2, act deg 8": dict(tolerance=1e-2, activation={"degree": 8}),
    "tol 1e-4, act deg 24": dict(tolerance=1e-4, activation={"degree": 24}),
    "newton reciprocal": dict(reciprocal={"method": "newton"}),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, nargs="*", help="saved PolyAttn folders (default: train tiny ones)")
    parser.add_argument("--text", nargs="*", type=Path, help="text files (default: Shakespeare)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the tiny models")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--calibration-blocks", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=200)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/polynomial_fidelity.md"))
    args = parser.parse_args(argv)

    texts = read_texts(args.text)
    train_text, eval_text = split_text(texts)
    models = {}
    if args.model:
        for folder in args.model:
            models[str(folder)] = (AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))
    else:
        for power, form in ((4, "sum"), (4, "mean"), (8, "sum")):
            result = pretrain(texts, "runs/fidelity", steps=args.steps, block_size=args.block, attn_power=power, attn_form=form)
            models[f"tiny p={power} {form} (1.25M)"] = (result.model, result.tokenizer)

    rows = []
    for name, (model, tokenizer) in models.items():
        model.eval()
        calibration = calibration_batches(tokenizer, [train_text], args.block, args.calibration_blocks)
        held_out = torch.tensor(text_blocks(tokenizer, [eval_text], args.block)["input_ids"][: args.eval_blocks])
        for setting, options in SETTINGS.items():
            start = time.perf_counter()
            model.to_exact().to_polynomial(calibration_data=calibration, progress=False, **options)
            depth = model.polynomial_report()["total_depth"]
            scores = polynomial_fidelity(model, held_out)
            rows.append((name, setting, depth, scores, time.perf_counter() - start))
            print(f"{name} | {setting}: {scores}", file=sys.stderr)

    lines = [
        "| model | approximations | total depth | ppl exact | ppl polynomial | Δppl | top-1 agreement | max |Δlogit| | mean |Δlogit| |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, setting, depth, s, _ in rows:
        lines.append(
            f"| {name} | {setting} | {depth} | {s['ppl_exact']:.3f} | {s['ppl_poly']:.3f} | "
            f"{100 * (s['ppl_poly'] / s['ppl_exact'] - 1):+.3f} % | {100 * s['top1_agreement']:.2f} % | "
            f"{s['max_dlogit']:.2e} | {s['mean_dlogit']:.2e} |"
        )
    table = "\n".join(lines)
    command = command_line(__file__, argv)
    held = f"{args.eval_blocks} held-out blocks of {args.block} tokens (last 5 % of the text, never trained on)"
    write_results(
        args.results,
        "# Polynomial form vs exact model\n\n"
        f"Command: `{command}` (CPU, 2 cores)\n\n"
        f"Calibration: {args.calibration_blocks} training blocks of {args.block} tokens; evaluation: {held}.\n"
        "Depth: the critical-path multiplicative depth of the whole model without refreshes "
        "(`model.polynomial_report()`).\n\n" + table + "\n",
    )


if __name__ == "__main__":
    main()
