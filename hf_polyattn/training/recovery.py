"""The whole CPU recipe that turns a softmax checkpoint into a working PolyAttn model, in one call.

    convert → attention transfer → distillation (cached top-k teacher, bf16) → polynomial form

with a wall-time budget: each stage is planned from measured throughputs before it starts, the
distillation takes what the later stages leave, and the run stops at a stage boundary with a
usable model when the budget runs out (and says so). Everything is resumable: `out_dir/state.json`
records the settings and the finished stages, attention transfer checkpoints every layer and
distillation every `save_every` steps, so re-running the same call continues where it stopped (a
different teacher, power, form, eps or data is refused by name). After each stage the model is
scored (benchmarks, held-out KL to the teacher and perplexity) into `state.json`'s rows, which
`format_recovery_table` prints.

The polynomial stage first truncates what training changed to what ships (`delta_rank`: a
low-rank fp16 delta over the teacher's checkpoint, `polynomial/delta/`, which `load_checkpoint`
rebuilds the model from), then calibrates and measures that model.
"""

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from datasets import concatenate_datasets
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils.logging import tqdm

from ..conversion.checkpoints import load_checkpoint
from ..conversion.convert import convert_checkpoint
from ..conversion.delta import base_state, keep_delta, save_delta, weights_hash
from ..evaluation.benchmarks import evaluate_task
from ..evaluation.fidelity import held_out_kl_and_perplexity, polynomial_fidelity
from ..evaluation.tasks import MULTIPLE_CHOICE
from ..modeling.polynomial import DEFAULT_TOLERANCE
from .attention_transfer import record_teacher, transfer_attention
from .calibrate import calibration_batches
from .corpora import read_texts
from .data import text_blocks
from .distill import Deadline, DistillationTrainer, HeldOutCurve, merge_trained, native_bf16, select_trainable
from .fewshot import episodes_for_share, fewshot_blocks
from .pretrain import split_text
from .storage import write_json_atomic
from .teacher_cache import CACHE_BATCH, build_teacher_cache, reachable_blocks, teacher_topk

STATE = "state.json"
STAGES = ("transferred", "distilled", "polynomial")  # "converted" is recomputed from the teacher in seconds
FINAL_ROWS = ("teacher", "polynomial")  # scored on `eval_limit` items per task, the others on `quick_eval_limit`

# Throughputs measured on 2 cores with avx512_bf16 (SmolLM2-135M, benchmarks/results/
# conversion_smollm2_cpu.md); they plan the stages, scaled by this machine's pace once a row is
# scored (`Recovery._machine_speed`); the distillation times its own; the deadline and the budget
# checks between stages catch the rest.
TEACHER_TOKENS_PER_SECOND = 120.0  # teacher forward with every layer's attention recorded
TRANSFER_SECONDS_PER_LAYER_PER_BLOCK = 0.3  # one 512-token block: forward+backward+error passes
# The default run's (2026-12-01): only their ratio plans a run, the cache's rate is timed on the machine
CACHE_TOKENS_PER_SECOND = 595.0  # teacher top-k cache (bf16, CACHE_BATCH blocks per forward)
DISTILL_TOKENS_PER_SECOND = 174.0  # cached top-k, bf16 autocast, all parameters, with the range loss
CALIBRATION_TOKENS_PER_SECOND = 550.0  # exact-form forward recording every approximation's inputs
HELD_OUT_TOKENS_PER_SECOND = 500.0  # held-out KL and perplexity: student and teacher forwards, fp32
# Seconds per item of each task, fp32, batch 16, with `score_continuations` running shared contexts
# and few-shot prompts once (the exact form of the shipped SmolLM2 at 50 items: 71 s for the seven
# tasks; its polynomial form's circuits take 140 s)
EVAL_SECONDS_PER_ITEM = {"hellaswag": 0.41, "piqa": 0.20, "arc_easy": 0.16, "arc_challenge": 0.22, "winogrande": 0.10,
                         "lambada": 0.14, "arc_easy_5shot": 0.20}
EVAL_SECONDS_PER_OTHER_ITEM = 0.3  # a task not measured above
POLYNOMIAL_SLOWDOWN = 2.0
POLYNOMIAL_STAGE_TOKENS_PER_SECOND = 200.0  # calibration + fidelity tokens per second of the stage (SmolLM2: 666 s)
MAX_SLOWDOWN = 4.0  # the machine speed read from scored rows is clipped to [1/4, 4]
MIN_DISTILL_SECONDS = 300.0
RECOVERY_CORPORA = ("shakespeare", "bigbench")
DELTA_FOLDER = "delta"  # inside the polynomial stage's folder: what `load_checkpoint` rebuilds the model from


@dataclass
class RecoverySettings:
    """Everything that defines a recovery run; the fields marked `identity` must match on resume."""

    teacher: str = "smollm2"
    attn_power: int = 4
    attn_eps: float = 1e-6
    attn_form: str = "sum"
    # read_texts(): files, folders, corpora. Shakespeare alone (archaic verse) left LAMBADA's modern
    # prose far behind; Wikipedia sentences and dialogue follow it, so the held-out tail is modern.
    data: tuple[str, ...] = RECOVERY_CORPORA
    seed: int = 0
    # attention transfer
    transfer_tokens: int = 65536
    transfer_block: int = 512
    transfer_batch: int = 4
    transfer_lr: float = 3e-3
    transfer_inputs: str = "student"
    # distillation
    distill_block: int = 256
    distill_batch: int = 4
    distill_lr: float = 2e-4
    distill_train: str = "all"
    distill_max_tokens: int | None = None  # None: as many as the budget allows
    distill_curve_points: int = 4  # held-out KL and perplexity at this many points of the distillation
    # Share of the distillation blocks that are in-context episodes built from the training text
    # (training/fewshot.py): running text alone did not bring few-shot learning back (SmolLM2's
    # ARC-E 5-shot gain +0.008 vs the teacher's +0.096 after 8.7M tokens on an H200; +0.040 after
    # 13.4M more with 31 % episodes, LAMBADA and the MC mean up too).
    fewshot_share: float = 0.3
    topk: int = 64
    range_loss_weight: float = 0.1
    save_every: int = 50
    # polynomial form
    # What ships is base + a rank-r change of each matrix (`conversion.delta`), truncated before
    # calibration so the polynomial row measures it. None: the full changes (270 MB for SmolLM2).
    delta_rank: int | None = 64
    # SmolLM2: 32 blocks of 128 left held-out normalisers 6x above the top; 64 of 256 left one LAMBADA
    # item NaN (an activation input 4 % past its domain); 512 of 256 (4 min) none, top-1 99.6 %
    calibration_blocks: int = 512
    calibration_block: int = 256
    tolerance: float = DEFAULT_TOLERANCE
    # evaluation
    tasks: tuple[str, ...] = MULTIPLE_CHOICE + ("lambada", "arc_easy_5shot")
    eval_limit: int = 500  # items per task for the reference and final rows (FINAL_ROWS)
    # for the intermediate rows (converted, transferred, distilled): the curve's shape. The distilled
    # row at 500 items took 10 of the default 150 minutes; its exact form is within 0.5 % of the
    # polynomial row's next-token predictions, which are scored at 500.
    quick_eval_limit: int = 100
    held_out_blocks: int = 16
    held_out_block: int = 256
    evaluate_stages: tuple[str, ...] = ("teacher", "converted") + STAGES

    IDENTITY = ("teacher", "attn_power", "attn_eps", "attn_form", "data", "seed", "transfer_tokens",
                "transfer_block", "transfer_inputs", "distill_block", "distill_batch", "distill_train", "topk",
                "distill_max_tokens", "fewshot_share")

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        self.data = tuple(self.data or RECOVERY_CORPORA)
        self.evaluate_stages = tuple(self.evaluate_stages)
        if not 0 <= self.fewshot_share < 1:
            raise ValueError(f"fewshot_share must be in [0, 1), got {self.fewshot_share}")
        unknown = set(self.evaluate_stages) - {"teacher", "converted", *STAGES}
        if unknown:
            raise ValueError(f"unknown stages to evaluate {sorted(unknown)}; known: teacher, converted, {', '.join(STAGES)}")


def parse_budget(text: str) -> float:
    """`"2h30m"`, `"90m"`, `"45s"` or plain seconds → seconds."""
    total, number, units = 0.0, "", {"h": 3600, "m": 60, "s": 1}
    for char in text.strip().lower():
        if char.isdigit() or char == ".":
            number += char
        elif char in units and number:
            total, number = total + float(number) * units[char], ""
        else:
            raise ValueError(f"cannot read the budget {text!r}: use e.g. 2h30m, 90m or 5400")
    total += float(number) if number else 0.0
    if total <= 0:
        raise ValueError(f"the budget must be positive, got {text!r}")
    return total


def _format_seconds(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


class Recovery:
    """One recovery run in `out_dir` (see the module docstring); `run(budget_seconds)` does the work."""

    def __init__(self, settings: RecoverySettings, out_dir: str | Path, progress: bool = True):
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.state = self._load_state()

    # ------------------------------------------------------------------ state and planning
    def _load_state(self) -> dict[str, Any]:
        path = self.out_dir / STATE
        wanted = asdict(self.settings)
        if not path.is_file():
            return {"settings": wanted, "stages": {}, "rows": {}, "runs": []}
        state = json.loads(path.read_text())
        for name in RecoverySettings.IDENTITY:
            before, now = state["settings"].get(name), wanted[name]
            if before != (list(now) if isinstance(now, tuple) else now):
                raise ValueError(
                    f"{name}: the run in {self.out_dir} was made with {before!r}, this one asks for {now!r}; "
                    "use another output folder or the same settings"
                )
        state["settings"] = wanted  # the others (learning rates, evaluation) may change on resume
        return state

    def _save_state(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out_dir / STATE, self.state)

    def _eval_limit(self, row: str) -> int:
        return self.settings.eval_limit if row in FINAL_ROWS else self.settings.quick_eval_limit

    def _eval_seconds(self, row: str) -> float:
        s = self.settings
        if row not in s.evaluate_stages or row in self.state["rows"]:
            return 0.0
        items = {task: self._eval_limit(row) for task in s.tasks}
        return self._planned_scoring_seconds(row, items) * self._machine_speed()

    def _planned_scoring_seconds(self, row: str, items: dict[str, int]) -> float:
        """Seconds to score `row` on `items[task]` items per task, at the constants' speed."""
        seconds = sum(EVAL_SECONDS_PER_ITEM.get(task, EVAL_SECONDS_PER_OTHER_ITEM) * n for task, n in items.items())
        seconds += self._held_out_seconds()
        return seconds * (POLYNOMIAL_SLOWDOWN if row == "polynomial" else 1.0)

    def _machine_speed(self) -> float:
        """How much longer this machine takes than the one the constants were measured on: actual
        over planned seconds of the rows scored so far (1 before any). Scoring and the polynomial
        stage are planned with it; the distillation times its own rates. A 2-core VM half as fast
        as the constants' machine scored SmolLM2's first rows at 1.4-1.6x their plan, and the
        later stages, planned at 1x, would have run 26 minutes past a 2h30m budget."""
        actual = planned = 0.0
        for row, scores in self.state["rows"].items():
            items = {task: scores[task]["n"] for task in self.settings.tasks if task in scores}
            actual, planned = actual + scores["seconds"], planned + self._planned_scoring_seconds(row, items)
        return min(MAX_SLOWDOWN, max(1 / MAX_SLOWDOWN, actual / planned)) if planned else 1.0

    def _held_out_seconds(self) -> float:
        return self.settings.held_out_blocks * self.settings.held_out_block / HELD_OUT_TOKENS_PER_SECOND

    def estimate(self, stage: str, num_layers: int = 30) -> float:
        """Planned seconds of `stage` (evaluation of its row included) on this machine: the
        constants' 2-core machine scaled by the speed the rows scored so far ran at."""
        s = self.settings
        if stage == "transferred":
            blocks = s.transfer_tokens // s.transfer_block
            seconds = s.transfer_tokens / TEACHER_TOKENS_PER_SECOND
            seconds += num_layers * blocks * TRANSFER_SECONDS_PER_LAYER_PER_BLOCK * s.transfer_block / 512
            seconds *= self._machine_speed()
        elif stage == "distilled":
            seconds = MIN_DISTILL_SECONDS
        else:  # polynomial: the delta's truncation, calibration, fidelity on the held-out blocks
            tokens = s.calibration_blocks * s.calibration_block + s.held_out_blocks * s.held_out_block
            seconds = tokens / POLYNOMIAL_STAGE_TOKENS_PER_SECOND * self._machine_speed()
        return seconds + self._eval_seconds(stage)

    # ------------------------------------------------------------------ the run
    def redo(self, stage: str) -> None:
        """Forget `stage` and every stage after it (their results and score rows), so the next
        `run` does them again from the stage before: e.g. `"polynomial"` after the approximations
        changed. The earlier stages' folders are kept and reused."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
        for later in STAGES[STAGES.index(stage) :]:
            self.state["stages"].pop(later, None)
            self.state["rows"].pop(later, None)
        self._save_state()

    def run(self, budget_seconds: float) -> dict[str, Any]:
        """Run the pending stages within `budget_seconds` of wall time; returns the state.

        Raises `ValueError` before any work when the budget cannot fit even the next stage.
        """
        s = self.settings
        start = time.monotonic()
        deadline = start + budget_seconds
        done = [stage for stage in STAGES if stage in self.state["stages"]]
        pending = STAGES[len(done) :]
        # finished stages whose scoring was interrupted are scored first
        unscored = [stage for stage in done if self._eval_seconds(stage)]
        if pending or unscored:
            first = sum(self._eval_seconds(row) for row in ("teacher", "converted", *unscored))
            first += self.estimate(pending[0]) if pending else 0.0
            if budget_seconds < first:
                what = f"the next stage ({pending[0]}" if pending else f"the scores of {', '.join(unscored)} ("
                raise ValueError(
                    f"a budget of {_format_seconds(budget_seconds)} is too small for {what}: "
                    f"≈ {_format_seconds(first)} on 2 cores); give at least that, or fewer "
                    "transfer tokens / evaluation items"
                )
        run_log = {"budget_seconds": budget_seconds, "stages": []}
        self.state["runs"].append(run_log)

        teacher, tokenizer = load_checkpoint(s.teacher)
        train_text, held_out_text = split_text(read_texts(s.data))
        held_out = torch.tensor(text_blocks(tokenizer, [held_out_text], s.held_out_block)["input_ids"][: s.held_out_blocks])
        self._evaluate("teacher", teacher, tokenizer, teacher, held_out)
        student = convert_checkpoint(teacher, attn_power=s.attn_power, attn_eps=s.attn_eps, attn_form=s.attn_form)
        self._evaluate("converted", student, tokenizer, teacher, held_out)

        loaded = {stage: self._load_stage(stage) for stage in unscored}
        for stage, model in loaded.items():
            self._evaluate(stage, model, tokenizer, teacher, held_out)
        if done and pending:  # the next stage starts from the last finished one
            student = loaded.get(done[-1]) or self._load_stage(done[-1])
        del loaded
        for stage in pending:
            folder = self.out_dir / stage
            left = deadline - time.monotonic()
            needed = self.estimate(stage, student.config.num_hidden_layers)
            later = sum(self.estimate(other, student.config.num_hidden_layers) for other in STAGES[STAGES.index(stage) + 1 :])
            if left < needed:
                self._stop(run_log, f"the budget has {_format_seconds(left)} left, {stage} needs ≈ {_format_seconds(needed)}")
                break
            stage_start = time.monotonic()
            if stage == "transferred":
                student, notes = self._transfer(teacher, student, tokenizer, train_text)
            elif stage == "distilled":
                # it takes what is left after its own row's scores and the later stages
                reserve = later + self._eval_seconds(stage)
                student, notes = self._distill(teacher, student, tokenizer, train_text, held_out, deadline=deadline - reserve)
            else:
                student, notes = self._polynomial(student, tokenizer, train_text, held_out, folder)
            student.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            seconds = time.monotonic() - stage_start
            self.state["stages"][stage] = {"seconds": seconds, "folder": str(folder), **notes}
            run_log["stages"].append(stage)
            self._save_state()
            self._evaluate(stage, student, tokenizer, teacher, held_out)
        run_log["seconds"] = time.monotonic() - start
        self._save_state()
        return self.state

    def _load_stage(self, stage: str):
        return AutoModelForCausalLM.from_pretrained(self.out_dir / stage).eval()

    def _stop(self, run_log: dict, reason: str) -> None:
        done = [stage for stage in STAGES if stage in self.state["stages"]]
        usable = self.out_dir / done[-1] if done else None
        message = f"stopped at a stage boundary: {reason}. " + (
            f"The last finished stage is in {usable}; run the same command again to continue."
            if usable else "No stage finished; run again with a larger budget."
        )
        run_log["stopped"] = message
        print(message)

    def _transfer(self, teacher, student, tokenizer, train_text: str):
        s = self.settings
        blocks = torch.tensor(text_blocks(tokenizer, [train_text], s.transfer_block)["input_ids"])
        blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(s.seed))]
        blocks = blocks[: max(1, s.transfer_tokens // s.transfer_block)]
        record = self.out_dir / "record"
        record_teacher(teacher, blocks, record, name=s.teacher, batch_size=s.transfer_batch, progress=self.progress)
        report = transfer_attention(
            student, record, self.out_dir / "transfer", lr=s.transfer_lr, batch_size=s.transfer_batch,
            inputs=s.transfer_inputs, seed=s.seed, progress=self.progress,
        )
        return student.eval(), {"layers": report}

    def _distill(self, teacher, student, tokenizer, train_text: str, held_out: torch.Tensor, deadline: float):
        s = self.settings
        bf16 = native_bf16()
        seconds = max(0.0, deadline - time.monotonic())
        tokens_per_step = s.distill_batch * s.distill_block
        # Plan the steps the time allows (the cache is built for exactly those blocks, so a resume
        # with the same plan reuses it); the deadline callback guards a slower machine.
        # running text and in-context episodes (`fewshot_share` of the mix), shuffled together
        mix = text_blocks(tokenizer, [train_text], s.distill_block)
        planned = self.state.get("distill_steps")
        if planned is None:
            # Both rates are this model's on this machine: the cache's is timed, the training's scaled
            # from it by SmolLM2's ratio (both scale with the forward's cost). Gemma 3 270M caches
            # 4x slower than SmolLM2 (its 262k-word head); SmolLM2's constants left it 1 step.
            cache_rate = measure_cache_rate(teacher, mix, s.topk, bf16)
            distill_rate = cache_rate * DISTILL_TOKENS_PER_SECOND / CACHE_TOKENS_PER_SECOND
            speed = self._machine_speed()
            calibration = 0.0  # the range loss's domains are calibrated first (4 min for SmolLM2)
            if s.range_loss_weight > 0:
                calibration = s.calibration_blocks * s.calibration_block / CALIBRATION_TOKENS_PER_SECOND * speed
            measuring = s.distill_curve_points * self._held_out_seconds() * speed
            seconds = max(0.0, seconds - calibration - measuring)
            planned = max(1, int(seconds / (1 / cache_rate + 1 / distill_rate) / tokens_per_step))
            if s.distill_max_tokens:
                planned = min(planned, max(1, s.distill_max_tokens // tokens_per_step))
            self.state["distill_steps"] = planned
            self.state["distill_plan"] = {"seconds": seconds, "calibration_seconds": calibration,
                                          "cache_tokens_per_second": cache_rate,
                                          "distill_tokens_per_second": distill_rate}
            self._save_state()
        fewshot = 0
        if s.fewshot_share:
            count = max(1, episodes_for_share(s.fewshot_share, len(train_text)))
            episodes = fewshot_blocks(tokenizer, [train_text], s.distill_block, count, s.seed)
            fewshot, mix = len(episodes), concatenate_datasets([mix, episodes])
        blocks = reachable_blocks(mix, planned * s.distill_batch, s.seed)
        cache = build_teacher_cache(
            teacher, blocks, self.out_dir / "teacher-cache", s.teacher, k=s.topk,
            autocast_dtype=torch.bfloat16 if bf16 else None, progress=self.progress,
        )
        if s.range_loss_weight > 0:  # domains from the transferred model, so distillation keeps them narrow
            student.to_polynomial(calibration_data=self._calibration(tokenizer, train_text), progress=False).to_exact()
        student = select_trainable(student.train(), s.distill_train)
        checkpoints = self.out_dir / "distill-checkpoints"
        arguments = TrainingArguments(
            output_dir=str(checkpoints), max_steps=planned, per_device_train_batch_size=s.distill_batch,
            learning_rate=s.distill_lr, adam_beta2=0.95, lr_scheduler_type="cosine",
            warmup_steps=min(30, planned // 10), bf16=bf16, use_cpu=not torch.cuda.is_available(),
            logging_steps=max(1, min(25, planned // 20)), save_steps=s.save_every, save_total_limit=1,
            report_to="none", seed=s.seed, disable_tqdm=not self.progress,
        )
        curve = HeldOutCurve(  # the quality-vs-time curve, on the held-out blocks the rows are scored on
            lambda model: held_out_kl_and_perplexity(model, teacher, held_out), self.out_dir / "distill-curve.json",
            s.distill_curve_points, tokens_per_step,
        )
        trainer = DistillationTrainer(
            model=student, args=arguments, train_dataset=cache, teacher=None,
            range_loss_weight=s.range_loss_weight, callbacks=[Deadline(deadline), curve],
        )
        resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        result = trainer.train(resume_from_checkpoint=resume)
        losses = [entry for entry in trainer.state.log_history if "loss" in entry]
        notes = {
            "steps": result.global_step, "planned_steps": planned,
            "tokens": result.global_step * tokens_per_step, "fewshot_share": fewshot / len(mix),
            "loss_curve": losses, "held_out_curve": curve.curve,
        }
        return merge_trained(student).eval(), notes

    def _calibration(self, tokenizer, train_text: str) -> list[torch.Tensor]:
        s = self.settings
        return calibration_batches(tokenizer, [train_text], s.calibration_block, s.calibration_blocks)

    def _polynomial(self, student, tokenizer, train_text: str, held_out: torch.Tensor, folder: Path):
        s = self.settings
        reference = base_state(student.config, s.teacher)
        stored = keep_delta(student, reference, s.delta_rank)  # the shipped weights, measured from here on
        student.to_exact().to_polynomial(
            calibration_data=self._calibration(tokenizer, train_text), tolerance=s.tolerance, progress=self.progress,
        )
        manifest = save_delta(stored, student.config, s.teacher, weights_hash(reference), folder / DELTA_FOLDER, max_bytes=None)
        fidelity = polynomial_fidelity(student, held_out, batch_size=4, progress=self.progress)
        report = student.polynomial_report()
        depth = {"total": report["total_depth"], "blocks": [block["depth"] for block in report["blocks"]]}
        return student, {"fidelity": fidelity, "depth": depth, "delta": {"rank": s.delta_rank, "bytes": manifest["bytes"]}}

    # ------------------------------------------------------------------ scores
    def _evaluate(self, row: str, model, tokenizer, teacher, held_out: torch.Tensor) -> None:
        s = self.settings
        if row not in s.evaluate_stages or row in self.state["rows"]:
            return
        start = time.monotonic()
        model.eval()
        scores = {
            task: evaluate_task(model, tokenizer, task, self._eval_limit(row), progress=self.progress)
            for task in tqdm(s.tasks, desc=f"evaluating {row}", disable=not self.progress)
        }
        scores.update(held_out_kl_and_perplexity(model, teacher, held_out))
        scores["seconds"] = time.monotonic() - start
        self.state["rows"][row] = scores
        self._save_state()


def measure_cache_rate(teacher, blocks, k: int, bf16: bool) -> float:
    """Tokens per second of the teacher's top-k cache on this machine: one forward of
    `CACHE_BATCH` of `blocks` (a `datasets.Dataset` of `input_ids`), the size the cache is built
    at, timed after a one-block warm-up. Timing 2 blocks instead read 813 tokens/s for SmolLM2
    where the cache then ran at 595 (the batch's logits leave the caches), and the distillation
    was planned 1.8x too long: cut by its deadline at 55 % of its steps with the learning rate
    still at half its peak, and 45 % of the cached tokens unused."""
    if len(blocks) < 2:  # nothing to time after the warm-up: SmolLM2's rate
        return CACHE_TOKENS_PER_SECOND
    ids = torch.tensor(blocks.select(range(min(len(blocks), CACHE_BATCH + 1)))["input_ids"])
    autocast_dtype = torch.bfloat16 if bf16 else None
    teacher_topk(teacher, ids[:1], k, autocast_dtype=autocast_dtype)
    start = time.perf_counter()
    teacher_topk(teacher, ids[1:], k, autocast_dtype=autocast_dtype)
    return ids[1:].numel() / (time.perf_counter() - start)


def recover(teacher: str = "smollm2", out_dir: str | Path = "runs/recovered", budget: str | float = "2h30m",
            progress: bool = True, redo: str | None = None, **settings) -> dict[str, Any]:
    """Convert `teacher` to PolyAttn and recover its quality within `budget` (see the module docstring).

    `settings` are `RecoverySettings` fields (`attn_power`, `transfer_tokens`, `eval_limit`, …);
    `redo`: a finished stage to do again, with the ones after it (`Recovery.redo`).
    Returns the run's state: finished stages with their seconds and notes, and the score rows.
    """
    unknown = set(settings) - {f.name for f in fields(RecoverySettings)}
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}")
    seconds = parse_budget(budget) if isinstance(budget, str) else float(budget)
    recovery = Recovery(RecoverySettings(teacher=teacher, **settings), out_dir, progress)
    if redo is not None:
        recovery.redo(redo)
    return recovery.run(seconds)


def format_recovery_table(state: dict[str, Any]) -> str:
    """The score rows of a run as a Markdown table (acc_norm for multiple choice, LAMBADA acc + bits/byte)."""
    settings = state["settings"]
    tasks = list(settings["tasks"])
    header = ["model", *tasks]
    if "lambada" in tasks:
        header.insert(header.index("lambada") + 1, "lambada bits/byte")
    header += ["MC mean", "held-out KL", "perplexity", "stage s", "eval s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, scores in state["rows"].items():
        cells = []
        for task in tasks:
            metric = "acc" if task == "lambada" else "acc_norm"
            cells.append(f"{scores[task][metric]:.3f}")
            if task == "lambada":
                cells.append(f"{scores[task]['bits_per_byte']:.3f}")
        mc = [scores[task]["acc_norm"] for task in MULTIPLE_CHOICE if task in scores]
        stage_seconds = state["stages"].get(row, {}).get("seconds")
        cells += [
            f"{sum(mc) / len(mc):.3f}" if len(mc) == len(MULTIPLE_CHOICE) else "—",
            f"{abs(scores['kl']):.3f}",  # the teacher against itself: -0.000 from rounding
            f"{scores['perplexity']:.1f}",
            f"{stage_seconds:.0f}" if stage_seconds else "—",
            f"{scores['seconds']:.0f}",
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
