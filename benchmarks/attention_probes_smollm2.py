"""Inductive bias of the real model: per-layer attention distance and entropy, SmolLM2 (softmax)
vs its Power-Softmax p=4 conversion before and after recovery (the shipped `smollm2-polyattn`).

    python benchmarks/attention_probes_smollm2.py                  # 8 held-out blocks of 256 tokens

Held-out text: the recovery recipe's own (`RecoverySettings`: disjoint from its training text).
Attention weights come from each model's forward pass (`evaluation.probes.attention_locality`:
rows renormalised, mean over heads and queries); the recovered model in its exact form and in the
polynomial form it ships in. Writes Markdown to --results and a plot next to it.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from hf_polyattn.conversion.checkpoints import load_checkpoint
from hf_polyattn.conversion.convert import convert_checkpoint
from hf_polyattn.evaluation.probes import attention_locality
from hf_polyattn.training.corpora import read_texts
from hf_polyattn.training.data import text_blocks
from hf_polyattn.training.pretrain import split_text
from hf_polyattn.training.recovery import RecoverySettings
from report import command_line, write_results


def locality(model, blocks: torch.Tensor, batch: int) -> np.ndarray:
    """`(layers, 2)`: mean distance (tokens) and entropy (nats) per layer, averaged over `blocks`."""
    parts = []
    for start in range(0, len(blocks), batch):
        layers = attention_locality(model, blocks[start : start + batch])
        parts.append([(layer.mean_distance, layer.entropy) for layer in layers])
    return np.mean(parts, axis=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/attention_probes_smollm2.md"))
    args = parser.parse_args(argv)

    settings = RecoverySettings()
    teacher, tokenizer = load_checkpoint(settings.teacher)
    teacher.set_attn_implementation("eager")  # SDPA returns no attention weights
    _, held_out_text = split_text(read_texts(settings.data))
    blocks = torch.tensor(text_blocks(tokenizer, [held_out_text], args.block)["input_ids"][: args.blocks])
    rows = {"teacher (softmax)": locality(teacher, blocks, args.batch)}
    converted = convert_checkpoint(teacher, attn_power=settings.attn_power, attn_eps=settings.attn_eps,
                                   attn_form=settings.attn_form)
    rows[f"converted p={settings.attn_power}, untrained"] = locality(converted, blocks, args.batch)
    del converted
    recovered, _ = load_checkpoint("smollm2-polyattn")
    rows[f"recovered p={settings.attn_power} (polynomial form)"] = locality(recovered, blocks, args.batch)
    rows[f"recovered p={settings.attn_power} (exact form)"] = locality(recovered.to_exact(), blocks, args.batch)

    names = list(rows)
    header = "| layer | " + " | ".join(names) + " |"
    table = [header, "|---|" + "---|" * len(names)]
    for layer in range(len(rows[names[0]])):
        table.append(f"| {layer} | " + " | ".join(f"{rows[n][layer, 0]:.1f} / {rows[n][layer, 1]:.2f}" for n in names) + " |")
    table.append("| **mean** | " + " | ".join(f"**{rows[n][:, 0].mean():.1f} / {rows[n][:, 1].mean():.2f}**" for n in names) + " |")
    teacher_rows = rows[names[0]]
    gaps = {n: np.abs(rows[n] - teacher_rows).mean(axis=0) for n in names[1:]}
    text = (
        "# Attention distance and entropy per layer: SmolLM2 vs its Power-Softmax conversion\n\n"
        f"Command: `{command_line(__file__, argv)}` (CPU). {args.blocks} held-out blocks of {args.block} tokens "
        "(the recovery recipe's held-out text). Each cell: mean attention distance in tokens / entropy in nats, "
        "averaged over heads and queries (rows renormalised to sum to 1).\n\n"
        + "\n".join(table)
        + "\n\nMean absolute gap to the teacher over layers (distance / entropy): "
        + "; ".join(f"{n}: {gap[0]:.1f} / {gap[1]:.2f}" for n, gap in gaps.items())
        + f".\n\n![distance and entropy per layer]({args.results.with_suffix('.png').name})\n"
    )
    write_results(args.results, text)
    _plot(rows, args.results.with_suffix(".png"))


def _plot(rows: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, values in rows.items():
        left.plot(values[:, 0], marker=".", label=name)
        right.plot(values[:, 1], marker=".", label=name)
    left.set_xlabel("layer")
    left.set_ylabel("mean attention distance (tokens)")
    right.set_xlabel("layer")
    right.set_ylabel("attention entropy (nats)")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
