"""Distillation: bring a converted PolyAttn student back to its softmax teacher's quality."""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .range_loss import RangeLoss


def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`T² · KL(teacher ‖ student)` of the temperature-softened distributions, mean over kept tokens."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    if mask is not None:
        mask = mask.to(per_token.dtype)
        return temperature**2 * (per_token * mask).sum() / mask.sum().clamp_min(1)
    return temperature**2 * per_token.mean()


class DistillationTrainer(Trainer):
    """A `Trainer` whose loss makes the student match a frozen teacher.

    loss = kl_weight · T²·KL(teacher‖student) on logits
         + hidden_weight · mean over layers of MSE(student hidden states, teacher hidden states)
         + lm_weight · the student's own LM loss (needs `labels`)
         + range_loss_weight · `RangeLoss` (needs calibrated domains)

    Works with PEFT students, gradient accumulation, bf16 and several processes like any
    `Trainer` (each process holds its own teacher copy). The separate terms are logged.
    """

    def __init__(
        self,
        *args,
        teacher: nn.Module,
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
        self.teacher = teacher.eval().requires_grad_(False).to(self.args.device)
        self.temperature = temperature
        self.weights = {"kl": kl_weight, "hidden": hidden_weight, "lm": lm_weight}
        self.range_loss = RangeLoss(self.model, range_loss_weight) if range_loss_weight > 0 else None
        self._terms: dict[str, float] = {}

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, **kwargs):
        want_hidden = self.weights["hidden"] > 0
        student_inputs = dict(inputs)
        if not self.weights["lm"]:
            student_inputs.pop("labels", None)
        if self.range_loss is not None:
            self.range_loss.pop()
        outputs = model(**student_inputs, output_hidden_states=want_hidden)
        teacher_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            teacher = self.teacher(**teacher_inputs, output_hidden_states=want_hidden)

        mask = inputs.get("attention_mask")
        terms = {}
        if self.weights["kl"]:
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
