"""Where the encrypted time goes: a PolyAttn model evaluated over CKKS (TenSEAL), op by op.

    python benchmarks/ckks_latency.py                                   # tiny models, CPU
    python benchmarks/ckks_latency.py --configs smollm2-block --tokens 2

For each configuration: encrypted vs plaintext (polynomial form) logits, time per token, the
planner's prediction vs what was consumed, refreshes and bytes each way, and the per-operation
breakdown (the paper's table). Writes Markdown to --results and a bar chart next to it.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_polyattn import PolyAttnConfig, PolyAttnForCausalLM
from hf_polyattn.ckks import CKKSClient, CKKSParameters, SecureSession
from hf_polyattn.ckks.costs import measure_op_costs, predict_seconds
from report import command_line, write_results

CONFIGS = {
    "tiny-1L (d=32, 4/2 heads)": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
    "tiny-2L (d=32, 4/2 heads)": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "tiny-2L (d=64, 4/4 heads)": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "smollm2-block (d=576, 9/3 heads, 1 layer)": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3),
}


def build(fields: dict, seed: int = 0) -> PolyAttnForCausalLM:
    torch.manual_seed(seed)
    # init 0.15 gives the tiny models O(1) scores; at d=576 it would make the attention normaliser
    # span ~1e9 (too ill-conditioned for a 2^40 scale: the server refuses it), so wide models
    # take the usual 0.02
    init = 0.15 if fields["hidden_size"] <= 64 else 0.02
    config = PolyAttnConfig(vocab_size=97, initializer_range=init, attn_eps=1e-2, max_position_embeddings=256, **fields)
    model = PolyAttnForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    calibration = [torch.randint(3, 97, (4, 16), generator=generator) for _ in range(4)]
    return model.to_polynomial(calibration_data=calibration, progress=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny", help="'tiny', 'smollm2-block', or 'all'")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--ring", type=int, default=8192, help="poly_modulus_degree")
    parser.add_argument("--predict", type=int, nargs="*", default=[8, 32, 128],
                        help="sequence lengths to predict from the plan and measured op costs (not run)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/ckks_latency.md"))
    args = parser.parse_args(argv)
    names = [n for n in CONFIGS if args.configs == "all" or n.startswith(args.configs)]
    params = CKKSParameters(poly_modulus_degree=args.ring, levels=CKKSParameters.max_levels(args.ring))
    client = CKKSClient(params)
    growth = ["| model | " + " | ".join(f"T={t}: s/token (predicted)" for t in args.predict) + " |",
              "|---|" + "---|" * len(args.predict)]

    summary = ["| model | tokens | s / token (predicted) | max abs Δlogit (logit scale) | argmax equal | levels used (planned) | refreshes (planned) | MB to client / server |",
               "|---|---|---|---|---|---|---|---|"]
    breakdowns, chart = [], {}
    for name in names:
        model = build(CONFIGS[name])
        # the products' shapes depend on the model, not on the sequence length: price them once
        costs = measure_op_costs(params, SecureSession(model, client=client).server.plan(1)["matmuls"])
        for tokens in args.tokens:
            ids = torch.randint(3, 97, (1, tokens), generator=torch.Generator().manual_seed(tokens))
            session = SecureSession(model, client=client, mask_seed=0, max_tokens=tokens)
            server = session.server
            planned = server.plan(tokens)
            start = time.perf_counter()
            encrypted = session.logits(ids[0]).numpy()
            seconds = time.perf_counter() - start
            with torch.no_grad():
                plain = model(ids).logits[0].double().numpy()
            profiler = server.profiler
            summary.append(
                f"| {name} | {tokens} | {seconds / tokens:.2f} ({predict_seconds(planned, costs) / tokens:.2f}) | {np.abs(encrypted - plain).max():.2e} ({np.abs(plain).max():.2f}) | "
                f"{bool((encrypted.argmax(-1) == plain.argmax(-1)).all())} | {server.engine.levels_consumed} ({planned['levels_consumed']}) | "
                f"{profiler.refreshes} ({planned['refreshes']}) | {profiler.bytes['to_client'] / 1e6:.1f} / {profiler.bytes['to_server'] / 1e6:.1f} |"
            )
            per_scope = ", ".join(f"{scope} {s:.2f} s" for scope, s in profiler.scope_seconds.items())
            breakdowns.append(f"### {name}, {tokens} tokens\n\n{profiler.table()}\n\nper layer: {per_scope}\n")
            chart[f"{name.split(',')[0]}) T={tokens}"] = dict(profiler.seconds)
            print(summary[-1], file=sys.stderr, flush=True)
        predicted = [predict_seconds(server.plan(t), costs) / t for t in args.predict]
        growth.append(f"| {name} | " + " | ".join(f"{p:.2f}" for p in predicted) + " |")

    ring = f"N={params.poly_modulus_degree}, modulus chain {list(params.coeff_mod_bit_sizes)} ({params.security}), scale 2^{params.scale_bits}"
    command = command_line(__file__, argv)
    text = (
        "# CKKS latency of encrypted PolyAttn forward passes\n\n"
        f"Command: `{command}` (TenSEAL {__import__('tenseal').__version__}, CPU, 2 cores). Ring: {ring}.\n"
        "Token by token with the encrypted KV cache; refreshes are masked round trips to an in-process client. "
        "Predicted times: the planner's operation counts priced by per-operation costs measured on this ring "
        "(`hf_polyattn.ckks.costs`).\n\n"
        + "\n".join(summary)
        + "\n\n## How the time grows with T and d (predicted, mean over the T steps)\n\n"
        + "\n".join(growth) + "\n\n" + "\n".join(breakdowns)
    )
    write_results(args.results, text)
    plot(chart, args.results.with_suffix(".png"))


def plot(chart: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for row in chart.values() for k in row}, key=lambda k: -sum(r.get(k, 0) for r in chart.values()))
    figure, axis = plt.subplots(figsize=(9, 0.6 * len(chart) + 2))
    left = np.zeros(len(chart))
    colors = plt.get_cmap("tab20").colors
    for color, kind in zip(colors, kinds):
        totals = np.array([sum(row.values()) for row in chart.values()])
        shares = np.array([row.get(kind, 0.0) for row in chart.values()]) / totals * 100
        axis.barh(list(chart), shares, left=left, label=kind, color=color)
        left += shares
    axis.set_xlabel("share of encrypted time (%)")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
