"""The polynomial form fitted to the CKKS ring: refreshes, levels, depth and accuracy, before and after.

    python benchmarks/ring_fit.py                      # the embedded model and SmolLM2 (attn_eps 1)
    python benchmarks/ring_fit.py --models embedded    # the embedded model only (seconds)

For each model, calibrated as it is encrypted (the embedded model on held-out Shakespeare as
`examples/train_default_model.py` does; the shipped SmolLM2 with its normaliser floor raised to 1
and recalibrated, as `benchmarks/secure_smollm2.py --attn-eps 1.0` does), three polynomial forms
on the default ring (N=8192, 2 levels between refreshes): the shallowest circuits site by site
(`to_polynomial`), `fit_to_ring` (the fewest refreshes), and `fit_to_ring(max_block_depth=40)`.
Per form: the server's planned refreshes and levels per step over the sequence, each block's
depth, the predicted seconds per step (the planner's operation counts priced by per-op costs
measured on this ring), and the polynomial form against the exact one on held-out text. Planned,
not run: the planner equals the server's consumed levels and refreshes (tests), and
`secure_generation.py` / `secure_smollm2.py --fit-ring` measure the encrypted runs.
Writes Markdown to --results and a bar plot next to it.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from hf_polyattn.assets import load_default_model
from hf_polyattn.ckks import CKKSClient, CKKSParameters, CKKSServer, ClientRoundTrip, fit_to_ring
from hf_polyattn.ckks.costs import measure_op_costs, predict_seconds
from hf_polyattn.conversion.checkpoints import load_checkpoint
from hf_polyattn.evaluation.fidelity import polynomial_fidelity
from hf_polyattn.modeling.circuit import circuit_depths
from hf_polyattn.training.calibrate import calibrate, calibration_batches
from hf_polyattn.training.corpora import read_texts
from hf_polyattn.training.data import text_blocks
from hf_polyattn.training.pretrain import split_text
from hf_polyattn.training.recovery import RecoverySettings
from report import command_line, write_results
from secure_smollm2 import recalibrate

BLOCK_DEPTH_BOUND = 40  # issue 14's target, and the bound the embedded model ships fitted to
# each form: its label and the `fit_to_ring` options (None: `to_polynomial`'s shallowest circuits)
FORMS = (
    ("shallowest (to_polynomial)", None),
    ("fit_to_ring", {"max_block_depth": None}),
    (f"fit_to_ring, ≤ {BLOCK_DEPTH_BOUND} levels per block", {"max_block_depth": BLOCK_DEPTH_BOUND}),
)


def _embedded(held_out_blocks: int):
    """Calibrated on held-out Shakespeare as `examples/train_default_model.py` does (the training
    text is what it learnt), measured on the last blocks of that text the calibration did not see."""
    model, tokenizer = load_default_model()
    _, held_out = split_text(read_texts(None))
    calibration = {"block_size": 128, "num_blocks": 64}

    def prepare():
        calibrate(model.to_exact(), tokenizer, [held_out], **calibration, progress=False)

    seen = torch.cat(calibration_batches(tokenizer, [held_out], **calibration))
    blocks = torch.tensor(text_blocks(tokenizer, [held_out], calibration["block_size"])["input_ids"])
    unseen = blocks[~(blocks[:, None] == seen[None]).all(-1).any(-1)]
    return model, prepare, unseen[-held_out_blocks:], {"lm_head": True, "tokens": 25}


def _smollm2(held_out_blocks: int):
    """Recalibrated on the recovery recipe's training text (`recalibrate`), measured on its held-out text."""
    model, tokenizer = load_checkpoint("smollm2-polyattn")
    _, held_out = split_text(read_texts(RecoverySettings().data))

    def prepare():
        recalibrate(model, tokenizer, 1.0, 64)

    blocks = torch.tensor(text_blocks(tokenizer, [held_out], 128)["input_ids"][:held_out_blocks])
    return model, prepare, blocks, {"lm_head": False, "tokens": 21}


MODELS = {"embedded": ("embedded default (2 layers, d=64)", _embedded, 64),
          "smollm2": ("SmolLM2-135M, attn_eps 1 (30 layers)", _smollm2, 8)}


def measure(model, client, params, options, blocks, model_costs: dict) -> dict:
    """One form's plan, depths, predicted seconds and accuracy; `model_costs` holds the model's
    per-op costs, measured at its first form (every form has the same product shapes)."""
    server = CKKSServer(model, client.public_context(), ClientRoundTrip(client), lm_head=options["lm_head"])
    tokens = options["tokens"]
    plan = server.plan(tokens)
    if "costs" not in model_costs:
        model_costs["costs"] = measure_op_costs(params, plan["matmuls"])
    depths = [b["depth"] for b in circuit_depths(server.circuit_plan, lm_head=options["lm_head"])["blocks"]]
    fidelity = polynomial_fidelity(model, blocks)
    return {
        "refreshes": plan["refreshes"] / tokens,
        "levels": plan["levels_consumed"] / tokens,
        "depths": (min(depths), max(depths)),
        "seconds": predict_seconds(plan, model_costs["costs"]) / tokens,
        **fidelity,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=["embedded", "smollm2"])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/ring_fit.md"))
    args = parser.parse_args(argv)
    params, client = CKKSParameters(), CKKSClient()
    rows = []
    for name in args.models:
        label, load, held_out_blocks = MODELS[name]
        model, prepare, blocks, options = load(held_out_blocks)
        model_costs = {}
        for form, fit in FORMS:
            start = time.perf_counter()
            prepare()
            if fit is not None:
                fit_to_ring(model, params, **fit, progress=False)
            seconds = time.perf_counter() - start
            rows.append((label, form, seconds, measure(model, client, params, options, blocks, model_costs)))
            print(rows[-1], file=sys.stderr)
    lines = [
        "| model | polynomial form | refreshes per step | levels per step | levels per block | predicted s per step "
        "| top-1 agreement | perplexity exact → polynomial | max abs Δlogit | calibration + choice s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, form, seconds, m in rows:
        lines.append(
            f"| {label} | {form} | {m['refreshes']:.1f} | {m['levels']:.0f} | {m['depths'][0]}–{m['depths'][1]} | "
            f"{m['seconds']:.2f} | {100 * m['top1_agreement']:.2f} % | {m['ppl_exact']:.3f} → {m['ppl_poly']:.3f} | "
            f"{m['max_dlogit']:.3g} | {seconds:.0f} |"
        )
    text = (
        "# The polynomial form fitted to the ring\n\n"
        f"Command: `{command_line(__file__, argv)}` (CPU, 2 cores). Ring N={params.poly_modulus_degree}, chain "
        f"{list(params.coeff_mod_bit_sizes)}, {params.levels} levels between refreshes. Per step: the server's plan "
        "over the sequence (25 positions for the embedded model, 21 for SmolLM2, as in `secure_generation.py` and "
        "`secure_smollm2.py`), divided by its steps; predicted seconds: the plan priced by per-op costs measured on "
        "this ring (best of 3, at the host's speed of that moment: compare the forms of one model, not runs), every "
        "weight diagonal kept. Accuracy: the polynomial form against the exact one on held-out "
        "blocks of 128 tokens that the calibration did not see (64 for the embedded model, 8 for SmolLM2).\n\n"
        + "\n".join(lines) + "\n\n![refreshes per step](ring_fit.png)\n"
    )
    write_results(args.results, text)
    _plot(rows, args.results.with_suffix(".png"))


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for label, *_ in rows))
    figure, axes = plt.subplots(1, len(labels), figsize=(6 * len(labels), 4), squeeze=False)
    for axis, label in zip(axes[0], labels):
        mine = [(form, m) for l, form, _, m in rows if l == label]
        axis.bar(range(len(mine)), [m["refreshes"] for _, m in mine], color=["gray", "tab:blue", "tab:green"][: len(mine)])
        axis.set_xticks(range(len(mine)), [form.replace(", ", ",\n") for form, _ in mine], fontsize=8)
        axis.set_ylabel("refreshes per step (planned)")
        axis.set_title(label, fontsize=10)
        for i, (_, m) in enumerate(mine):
            axis.annotate(f"{m['depths'][0]}–{m['depths'][1]} levels/block", (i, m["refreshes"]), ha="center",
                          va="bottom", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
