"""Distillation: bring a converted PolyAttn student back to its softmax teacher's quality."""

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from .autocast import UnwrapsAfterTraining
from .range_loss import RangeLoss
from .storage import write_json_atomic
from .teacher_cache import CACHED_TARGET_KEYS, REST_LOGPROB, TOPK_INDICES, TOPK_LOGPROBS

TRAINABLE_CHOICES = ("all", "attention", "lora")


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`T² · KL(teacher ‖ student)` of the temperature-softened distributions, mean over kept tokens.

    Computed in fp32; the gradient flows to the student's logits only.
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.detach().float()
    if temperature != 1:
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    per_token = _FullKL.apply(student_logits, teacher_logits)
    if mask is not None:
        mask = mask.to(per_token.dtype)
        return temperature**2 * (per_token * mask).sum() / mask.sum().clamp_min(1)
    return temperature**2 * per_token.mean()


class _FullKL(torch.autograd.Function):
    """Per-token KL(softmax(teacher) ‖ softmax(student)) with a hand-written backward.

    Memory bound on CPU (see `_TopKRestKL`): fewer passes over [tokens, vocab] than autograd
    (≈1.7x faster). With p, q the teacher's and student's probabilities, ∂KL/∂logit = q·Σp − p.
    The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, logits, teacher_logits):
        log_p = torch.log_softmax(teacher_logits, dim=-1)
        p = log_p.exp()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        # Σ p (log p − log q) with log q = logits − lse, in place on log_p (not needed after this)
        per_token = log_p.sub_(logits).mul_(p).sum(-1) + lse.squeeze(-1) * p.sum(-1)
        ctx.save_for_backward(torch.sub(logits, lse).exp_(), p)
        return per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, p = ctx.saved_tensors
        return q.mul_(p.sum(-1, keepdim=True)).sub_(p).mul_(grad[..., None]), None


def topk_distillation_kl(
    student_logits: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    rest_logprob: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`T² · KL(teacher ‖ student)` from the teacher's top-k only, mean over kept tokens.

    Both distributions are coarse-grained to k + 1 outcomes: the teacher's top-k tokens, and one
    "rest" bucket holding all other tokens' mass. That is the KL of those k + 1 probabilities —
    exactly `distillation_kl` when k is the vocabulary size, a lower bound on it below (it ignores
    how the small rest mass is spread), and, unlike a KL over the renormalised top-k, it still
    penalises student mass on tokens the teacher rejects.

    Args:
        student_logits: `[..., vocab]`.
        topk_logprobs: `[..., k]` the teacher's log-probabilities at `temperature` (any float dtype).
        topk_indices: `[..., k]` their token ids (any integer dtype).
        rest_logprob: `[...]` log of the teacher's mass outside the top-k (-inf if none). If
            omitted it is recovered as `log(1 - Σ top-k)`, which is coarse for 16-bit values.
        temperature: the student's softening; must be the one the teacher's values were made at.
        mask: `[...]` 1 for tokens that count.
    """
    logits = student_logits.float() / temperature if temperature != 1 else student_logits.float()
    indices = topk_indices.long()
    log_teacher = topk_logprobs.float()
    if indices.shape[-1] >= logits.shape[-1]:
        rest_logprob = torch.full(indices.shape[:-1], float("-inf"), device=logits.device)  # nothing is left out
    elif rest_logprob is None:
        rest_logprob = torch.log((1 - log_teacher.exp().sum(-1)).clamp_min(0))
    per_token = _TopKRestKL.apply(logits, log_teacher, indices, rest_logprob.float())
    if mask is not None:
        mask = mask.to(per_token.dtype)
        return temperature**2 * (per_token * mask).sum() / mask.sum().clamp_min(1)
    return temperature**2 * per_token.mean()


class _TopKRestKL(torch.autograd.Function):
    """Per-token KL over the teacher's top-k plus the rest bucket, with a hand-written backward.

    The loss is memory bound on CPU ([tokens, vocab] fp32 is 200 MB at 4×256 tokens and a 49k
    vocabulary). Autograd through log_softmax / gather / scatter / logsumexp makes ~20 passes over
    such tensors and keeps several; this makes ~6 and keeps one, the student's probabilities,
    which become the gradient in place (≈4x faster, ~15 % of a bf16 SmolLM2 step on 2 cores).

    With q = softmax(logits), K the top-k, p_r / q_r the rest masses and S = Σ_K p + p_r (1 up
    to rounding): ∂KL/∂logit_j = S·q_j − p_j on K, and q_j·(S − p_r/q_r) elsewhere.
    q_r is summed from the non-top-k probabilities themselves (no 1 − Σ_K cancellation); it is
    floored at the smallest normal float, which only matters if the student puts < 1e-38 there.
    """

    @staticmethod
    def forward(ctx, logits, log_p, indices, log_p_rest):
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        log_q_k = logits.gather(-1, indices) - lse
        p = log_p.exp()
        per_token = (p * (log_p - log_q_k)).sum(-1)
        q = torch.sub(logits, lse).exp_()
        q.scatter_(-1, indices, 0.0)
        q_rest = q.sum(-1).clamp_min(torch.finfo(q.dtype).tiny)
        p_rest = log_p_rest.exp()
        has_rest = p_rest > 0
        zero = torch.zeros_like(p_rest)
        per_token = per_token + torch.where(has_rest, p_rest * (log_p_rest - q_rest.log()), zero)
        total = p.sum(-1) + p_rest
        ctx.save_for_backward(q, log_q_k, p, indices, total - torch.where(has_rest, p_rest / q_rest, zero), total)
        return per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, log_q_k, p, indices, rest_factor, total = ctx.saved_tensors
        grad_logits = q.mul_((grad * rest_factor)[..., None])  # q is not needed again: reuse its memory
        grad_logits.scatter_(-1, indices, grad[..., None] * (log_q_k.exp() * total[..., None] - p))
        return grad_logits, None, None, None


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (x86 AVX512-BF16 / AMX-BF16, Arm BF16).

    Without it PyTorch still runs bf16 but emulates it, usually slower than fp32, so autocast
    only pays off with these instructions. Reads /proc/cpuinfo; False where that is missing.
    """
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16() -> bool:
    """Whether bf16 autocast pays off here: a GPU that supports it, or a CPU with native bf16."""
    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_supports_bf16()


def select_trainable(student: nn.Module, train: str = "all", lora_rank: int = 16) -> nn.Module:
    """Choose which of the student's parameters distillation trains; returns the model to train.

    `"all"`: every parameter. `"attention"`: only the attention projections named in
    `hf_polyattn.LORA_TARGET_MODULES` (q/k/v/o); the rest is frozen. `"lora"`: a PEFT LoRA
    wrapper (rank `lora_rank`) on those projections; `merge_trained` folds it back before saving.
    """
    from hf_polyattn import LORA_TARGET_MODULES

    if train not in TRAINABLE_CHOICES:
        raise ValueError(f"train must be one of {TRAINABLE_CHOICES}, got {train!r}")
    if train == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=list(LORA_TARGET_MODULES), task_type="CAUSAL_LM")
        return get_peft_model(student, config)
    for name, parameter in student.named_parameters():
        module = name.split(".")[-2] if "." in name else ""
        parameter.requires_grad_(train == "all" or module in LORA_TARGET_MODULES)
    return student


def merge_trained(model: nn.Module) -> nn.Module:
    """The plain model to save: a PEFT wrapper merged into its base weights, anything else as is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


class DistillationTrainer(UnwrapsAfterTraining):
    """A `Trainer` whose loss makes the student match a frozen teacher.

    loss = kl_weight · T²·KL(teacher‖student) on logits
         + hidden_weight · mean over layers of MSE(student hidden states, teacher hidden states)
         + lm_weight · the student's own LM loss (needs `labels`)
         + range_loss_weight · `RangeLoss` (needs calibrated domains)

    The teacher is either live (`teacher=`, run on every batch) or cached: batches from a
    `TeacherCacheDataset` carry the teacher's top-k log-probabilities, and the KL term is then
    `topk_distillation_kl`, with no teacher forward at all (`teacher=None`). Cached targets are
    used whenever a batch has them; a live teacher is then only run for `hidden_weight > 0`.
    The temperature must be the one the cache was made at.

    Works with PEFT students, gradient accumulation, bf16 (on CPU too: `bf16=True, use_cpu=True`;
    the live teacher runs under the same autocast as the student) and several processes like any
    `Trainer` (each process holds its own teacher copy). The separate terms are logged.
    """

    def __init__(
        self,
        *args,
        teacher: nn.Module | None = None,
        temperature: float = 1.0,
        kl_weight: float = 1.0,
        hidden_weight: float = 0.0,
        lm_weight: float = 0.0,
        range_loss_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if min(kl_weight, hidden_weight, lm_weight, range_loss_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if kl_weight == hidden_weight == lm_weight == 0:
            raise ValueError("at least one of kl_weight, hidden_weight, lm_weight must be > 0")
        if teacher is None and hidden_weight > 0:
            raise ValueError(
                "hidden_weight > 0 needs a live teacher (a teacher cache holds top-k log-probabilities, "
                "not hidden states): pass teacher=, or set hidden_weight=0"
            )
        cache_temperature = getattr(self.train_dataset, "temperature", None)
        if cache_temperature is not None and cache_temperature != temperature:
            raise ValueError(
                f"the teacher cache holds log-probabilities at temperature {cache_temperature}, "
                f"but distillation asks for {temperature}"
            )
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device) if teacher is not None else None
        self.temperature = temperature
        self.weights = {"kl": kl_weight, "hidden": hidden_weight, "lm": lm_weight}
        self.range_loss = RangeLoss(self.model, range_loss_weight) if range_loss_weight > 0 else None
        self._terms: dict[str, float] = {}

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the cached targets in the batch: the default column filter drops what the model's
        # forward does not take.
        super()._set_signature_columns_if_needed()
        self._signature_columns += [key for key in CACHED_TARGET_KEYS if key not in self._signature_columns]

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, **kwargs):
        want_hidden = self.weights["hidden"] > 0
        cached = TOPK_LOGPROBS in inputs
        student_inputs = {k: v for k, v in inputs.items() if k not in CACHED_TARGET_KEYS}
        if not self.weights["lm"]:
            student_inputs.pop("labels", None)
        run_teacher = want_hidden or (self.weights["kl"] and not cached)
        if run_teacher and self.teacher is None:
            raise ValueError("no teacher: pass teacher= or train on a TeacherCacheDataset (batches with cached top-k)")
        if self.range_loss is not None:
            self.range_loss.pop()
        outputs = model(**student_inputs, output_hidden_states=want_hidden)
        teacher = None
        if run_teacher:
            teacher_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            # The student's forward is autocast by accelerate's wrapper (bf16/fp16); the teacher is
            # not wrapped, so give it the same autocast here (on CPU it is most of a step's time).
            with torch.no_grad(), self.accelerator.autocast():
                teacher = self.teacher(**teacher_inputs, output_hidden_states=want_hidden)

        mask = inputs.get("attention_mask")
        terms = {}
        if self.weights["kl"]:
            if cached:
                terms["kl"] = topk_distillation_kl(
                    outputs.logits, inputs[TOPK_LOGPROBS], inputs[TOPK_INDICES], inputs.get(REST_LOGPROB),
                    self.temperature, mask,
                )
            else:
                terms["kl"] = distillation_kl(outputs.logits, teacher.logits, self.temperature, mask)
        if want_hidden:
            pairs = list(zip(outputs.hidden_states[1:], teacher.hidden_states[1:]))
            terms["hidden"] = sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / len(pairs)
        if self.weights["lm"]:
            if outputs.loss is None:
                raise ValueError("lm_weight > 0 needs `labels` in the batch")
            terms["lm"] = outputs.loss
        loss = sum(self.weights[name] * value for name, value in terms.items())
        if self.range_loss is not None:
            terms["range"] = self.range_loss.pop().to(loss.device)
            loss = loss + terms["range"]
        if model.training:
            self._terms = {name: float(value.detach()) for name, value in terms.items()}
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update({f"distill_{name}": value for name, value in self._terms.items()})
        super().log(logs, *args, **kwargs)


class Deadline(TrainerCallback):
    """Stops training (after saving a checkpoint) when `time.monotonic()` passes `deadline`: the guard
    of a run planned from a measured throughput on a machine that turns out slower."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() >= self.deadline:
            control.should_save = control.should_training_stop = True


class HeldOutCurve(TrainerCallback):
    """The quality-vs-time curve of a distillation: `measure(model)` (e.g. held-out KL to the
    teacher and perplexity) at `points` evenly spaced steps of the planned run, and at the step
    where training stops early (a deadline). Each point (`step`, `tokens`, training `seconds`,
    and what `measure` returned) is appended to the JSON file at `path` as it is taken, so a
    resumed run keeps the points before its checkpoint (later ones are dropped and taken again).
    Measuring runs in eval mode without gradients and puts the model back in training mode."""

    def __init__(self, measure: Callable[[nn.Module], dict[str, float]], path: str | Path, points: int,
                 tokens_per_step: int):
        if points < 0:
            raise ValueError(f"points must be >= 0, got {points}")
        self.measure, self.path, self.points, self.tokens_per_step = measure, Path(path), points, tokens_per_step
        self.curve: list[dict[str, float]] = []
        self._steps: set[int] = set()
        self._start, self._seconds_before = 0.0, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        kept = json.loads(self.path.read_text()) if self.path.is_file() else []
        self.curve = [point for point in kept if point["step"] <= state.global_step]
        self._seconds_before = self.curve[-1]["seconds"] if self.curve else 0.0  # time since then is lost
        self._steps = {round(state.max_steps * i / self.points) for i in range(1, self.points + 1)} if self.points else set()
        self._start = time.monotonic()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if not self.points or (step not in self._steps and not control.should_training_stop):
            return
        if self.curve and self.curve[-1]["step"] == step:
            return
        training = model.training
        model.eval()
        with torch.no_grad():
            measured = self.measure(model)
        model.train(training)
        seconds = self._seconds_before + time.monotonic() - self._start
        self.curve.append({"step": step, "tokens": step * self.tokens_per_step, "seconds": seconds, **measured})
        write_json_atomic(self.path, self.curve)
