"""Depth of the polynomial circuit, before and after the depth work, and what it costs in accuracy.

    python benchmarks/polynomial_depth.py                                    # embedded + tiny models
    python benchmarks/polynomial_depth.py --smollm2 runs/smollm2-recovered/distilled
    python benchmarks/polynomial_depth.py --model runs/tiny-polyattn --tiny-steps 0   # saved folders

For each model: calibrate on training text, then for the previous approximations (constant
initial guesses, least-squares degree-16 activation: `previous_circuit.py`) and the current
defaults (minimax initial guesses with the fewest iterations, degree-15 minimax activation, input
maps folded into plaintext products): per site depth / ct×ct / ct×pt and max error, per block
depth, and the polynomial form vs the exact form on held-out blocks (next-token top-1 agreement,
perplexity change, max |Δlogit|). Writes a Markdown table and a bar plot side by side.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_polyattn.assets import load_default_model
from hf_polyattn.evaluation.fidelity import polynomial_fidelity
from hf_polyattn.training.calibrate import calibration_batches
from hf_polyattn.training.corpora import read_texts
from hf_polyattn.training.data import text_blocks
from hf_polyattn.training.pretrain import pretrain, split_text
from previous_circuit import previous_block_depths, previous_site_cost
from report import command_line, write_results

PREVIOUS = dict(reciprocal={"init_degree": 0}, inv_sqrt={"init_degree": 0}, activation={"degree": 16, "fit": "least_squares"})
SETTINGS = {
    "current defaults (tol 1e-3)": {},
    "current, tol 1e-2": dict(tolerance=1e-2),
    "current, tol 1e-4, act deg 31": dict(tolerance=1e-4, activation={"degree": 31}),
    "current, newton reciprocal": dict(reciprocal={"method": "newton"}),
}
LARGE_MODEL_SETTINGS = ("current defaults (tol 1e-3)", "current, tol 1e-2")  # 30 layers: fewer passes
TARGET_LEVELS_PER_BLOCK = 40


def _models(args, texts):
    embedded, tokenizer = load_default_model()
    yield "embedded default (2 layers, d=64)", embedded.to_exact(), tokenizer, texts
    # attn_eps is the normaliser's floor in score units: larger, the reciprocal's domain narrows
    # (fewer levels) but rows with small scores are damped (the exact model changes: ppl exact)
    variants = [(4, "sum", None), (4, "mean", None), (8, "sum", None)] + [(4, "sum", eps) for eps in args.tiny_eps]
    for power, form, eps in variants if args.tiny_steps else ():
        fields = dict(attn_power=power, attn_form=form, **({"attn_eps": eps} if eps is not None else {}))
        result = pretrain(texts, "runs/polynomial-depth", steps=args.tiny_steps, block_size=args.block, **fields)
        label = f"tiny p={power} {form}, attn_eps {result.model.config.attn_eps:g} (1.25M)"
        yield label, result.model, result.tokenizer, texts
    for folder in args.model or ():
        yield str(folder), AutoModelForCausalLM.from_pretrained(folder).to_exact(), AutoTokenizer.from_pretrained(folder), texts
    for folder in args.smollm2 or ():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to_exact()
        yield f"SmolLM2 {Path(folder).name} (30 layers)", model, AutoTokenizer.from_pretrained(folder), read_texts(args.smollm2_text)


def _evaluate(model, calibration, held_out, options, batch_size):
    start = time.perf_counter()
    model.to_exact().to_polynomial(calibration_data=calibration, progress=False, **options)
    report = model.polynomial_report()
    scores = polynomial_fidelity(model, held_out, batch_size=batch_size)
    return report, scores, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", type=Path, help="saved PolyAttn folders (small; Shakespeare text)")
    parser.add_argument("--smollm2", nargs="*", type=Path, help="PolyAttn SmolLM2 folders (e.g. a recovery stage)")
    parser.add_argument("--smollm2-text", nargs="*", default=["bigbench"], help="their calibration/held-out text")
    parser.add_argument("--tiny-steps", type=int, default=300, help="training steps of the tiny models (0: none)")
    parser.add_argument("--tiny-eps", type=float, nargs="*", default=[1e-2, 1e-1], help="attn_eps of extra p=4 sum tiny models")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--calibration-blocks", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=200)
    parser.add_argument("--smollm2-blocks", type=int, default=32, help="held-out blocks (of --block tokens) for SmolLM2")
    parser.add_argument("--smollm2-calibration-blocks", type=int, default=64)
    parser.add_argument("--smollm2-calibration-block", type=int, default=256)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/polynomial_depth.md"))
    args = parser.parse_args(argv)

    texts = read_texts()
    summary, site_tables, plot_rows = [], [], []
    for name, model, tokenizer, model_texts in _models(args, texts):
        model.eval()
        train_text, eval_text = split_text(model_texts)
        big = "SmolLM2" in name
        # a 30-layer model's normaliser tails need more text: 32 blocks of 128 left held-out rows 6x
        # above the calibrated top (NaN); 64 blocks of 256 none
        if big:
            calibration = calibration_batches(tokenizer, [train_text], args.smollm2_calibration_block, args.smollm2_calibration_blocks)
        else:
            calibration = calibration_batches(tokenizer, [train_text], args.block, args.calibration_blocks)
        held_out = torch.tensor(text_blocks(tokenizer, [eval_text], args.block)["input_ids"][: args.smollm2_blocks if big else args.eval_blocks])
        batch = 4 if big else 16

        before, before_scores, seconds = _evaluate(model, calibration, held_out, PREVIOUS, batch)
        before_blocks = previous_block_depths(model.config.polynomial["sites"], model.config)
        summary.append((name, "previous circuit", before_blocks, None, before_scores, seconds))
        print(f"{name} | previous: blocks {before_blocks} {before_scores}", file=sys.stderr)
        previous_sites = {site: previous_site_cost(spec) for site, spec in model.config.polynomial["sites"].items() if "kind" in spec}
        for setting, options in SETTINGS.items():
            if big and setting not in LARGE_MODEL_SETTINGS:
                continue
            after, scores, seconds = _evaluate(model, calibration, held_out, options, batch)
            blocks_after = [block["depth"] for block in after["blocks"]]
            summary.append((name, setting, blocks_after, after["total_depth"], scores, seconds))
            print(f"{name} | {setting}: blocks {blocks_after} {scores}", file=sys.stderr)
            if not options:
                plot_rows.append((name, before_blocks, blocks_after))
                site_tables.append(_site_table(name, after, previous_sites, before))
        model.to_exact()

    table = _summary_table(summary)
    command = command_line(__file__, argv)
    text = (
        "# Depth of the polynomial circuit, before and after\n\n"
        f"Command: `{command}` (CPU, 2 cores)\n\n"
        f"Calibration on training text: {args.calibration_blocks} blocks of {args.block} tokens per small model, "
        f"{args.smollm2_calibration_blocks} blocks of {args.smollm2_calibration_block} for SmolLM2 (its text: "
        f"{', '.join(args.smollm2_text)}); accuracy on held-out blocks of {args.block} ({args.eval_blocks}, resp. {args.smollm2_blocks}; "
        "the last 5 % of the text, never trained or calibrated on). Depth: levels consumed by one token's "
        "step from a fresh input, measured by running the server's circuit on symbolic ciphertexts "
        "(`model.polynomial_report()`); the previous circuit's by its formulas (`benchmarks/previous_circuit.py`). "
        f"Target: ≤ {TARGET_LEVELS_PER_BLOCK} levels per block with top-1 agreement ≥ 99.5 % and perplexity within 1 %.\n\n"
        + table + "\n\n![levels per block](polynomial_depth.png)\n\n" + "\n\n".join(site_tables) + "\n"
    )
    write_results(args.results, text)
    _plot(plot_rows, args.results.with_suffix(".png"))


def _summary_table(rows) -> str:
    lines = [
        "| model | circuit | levels per block | total depth | ppl exact | ppl polynomial | Δppl | top-1 agreement | max |Δlogit| |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, setting, blocks, total, s, _ in rows:
        per_block = f"{min(blocks)}–{max(blocks)}" if min(blocks) != max(blocks) else str(blocks[0])
        lines.append(
            f"| {name} | {setting} | {per_block} | {total if total is not None else sum(blocks)}{'' if total is not None else ' + head'} | "
            f"{s['ppl_exact']:.3f} | {s['ppl_poly']:.3f} | {100 * (s['ppl_poly'] / s['ppl_exact'] - 1):+.3f} % | "
            f"{100 * s['top1_agreement']:.2f} % | {s['max_dlogit']:.2e} |"
        )
    return "\n".join(lines)


def _site_table(name, report, previous_sites, previous_report) -> str:
    lines = [
        f"## {name}: per site (previous → current defaults)\n",
        "| site | domain | previous: depth / ct×ct / ct×pt | current: approximation | depth / ct×ct / ct×pt | max error |",
        "|---|---|---|---|---|---|",
    ]
    for site, described in report["sites"].items():
        old = previous_sites[site]
        shape = (
            f"degree {described['degree']} {described.get('fit', 'least_squares')}"
            if described["kind"] == "activation"
            else f"{described['method']}, init degree {described['init_degree']}, {described['iterations']} it."
        )
        domain = f"[{described['domain'][0]:.3g}, {described['domain'][1]:.3g}]"
        lines.append(
            f"| {site} | {domain} | {old['depth']} / {old['ct_ct']} / {old['ct_pt']} | {shape} | "
            f"{described['depth']} / {described['ct_ct']} / {described['ct_pt']} | {described['max_error']:.1e} {described['error_kind'][:3]} |"
        )
    blocks = ", ".join(f"{b['depth']} (attention {b['attention_depth']}, MLP {b['mlp_depth']})" for b in report["blocks"][:4])
    more = " …" if len(report["blocks"]) > 4 else ""
    lines.append(f"\nPer block (current): {blocks}{more}; final norm + head {report['head_depth']}; total {report['total_depth']}.")
    return "\n".join(lines)


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3 + 0.4 * len(rows)))
    labels = [name for name, _, _ in rows]
    y = range(len(rows))
    axis.barh([i + 0.2 for i in y], [max(before) for _, before, _ in rows], height=0.4, label="previous circuit")
    axis.barh([i - 0.2 for i in y], [max(after) for _, _, after in rows], height=0.4, label="current defaults")
    axis.axvline(TARGET_LEVELS_PER_BLOCK, color="k", linestyle="--", label=f"target {TARGET_LEVELS_PER_BLOCK}")
    axis.set_yticks(list(y), labels)
    axis.set_xlabel("levels per block (deepest block)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
