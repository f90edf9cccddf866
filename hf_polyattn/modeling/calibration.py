"""Recording the input ranges of every approximated step over calibration data."""

from collections.abc import Iterable
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .polynomial_form import approximated_ops, score_scaled_attentions

SAMPLES_PER_SITE = 200_000  # values kept per site for the percentiles


class RangeRecorder:
    """Min, max, |max| and a subsample (for percentiles) of the values one site has seen."""

    def __init__(self, generator: torch.Generator):
        self.min, self.max, self.absmax, self.count = float("inf"), float("-inf"), 0.0, 0
        self.samples: list[torch.Tensor] = []
        self._generator = generator

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        values = values.detach().flatten().float()
        if values.numel() == 0:
            return
        if not torch.isfinite(values).all():
            raise ValueError("non-finite values during calibration: the exact model overflows on this data")
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))
        self.absmax = max(self.absmax, float(values.abs().max()))
        self.count += values.numel()
        keep = min(values.numel(), SAMPLES_PER_SITE // 8)
        index = torch.randint(values.numel(), (keep,), generator=self._generator)
        self.samples.append(values.cpu()[index])

    def summary(self) -> dict[str, float]:
        if not self.samples:
            raise ValueError("a site saw no values during calibration (all inputs were padding?)")
        pool = torch.cat(self.samples)[-SAMPLES_PER_SITE:]
        low, high = torch.quantile(pool, torch.tensor([0.001, 0.999])).tolist()
        return {"min": self.min, "max": self.max, "absmax": self.absmax, "p0.1": low, "p99.9": high, "count": self.count}


@contextmanager
def unscaled_exact(base_model: nn.Module):
    """Exact steps and attention scores at scale 1, so the normaliser is seen in its own units."""
    attentions = score_scaled_attentions(base_model)
    saved_scales = {name: attention.score_scale for name, attention in attentions.items()}
    with ExitStack() as stack:
        for op in approximated_ops(base_model).values():
            stack.enter_context(op.exact_for_now())
        for attention in attentions.values():
            attention.set_score_scale(1.0)
        try:
            yield
        finally:
            for name, attention in attentions.items():
                attention.set_score_scale(saved_scales[name])


def _as_model_inputs(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TypeError("calibration batches must be LongTensors of token ids or dicts with 'input_ids'")
    ids = batch["input_ids"]
    ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids)
    inputs = {"input_ids": ids.reshape(-1, ids.shape[-1]).to(device)}
    if batch.get("attention_mask") is not None:
        mask = batch["attention_mask"]
        mask = mask if isinstance(mask, torch.Tensor) else torch.tensor(mask)
        inputs["attention_mask"] = mask.reshape(inputs["input_ids"].shape).to(device)
    return inputs


@torch.no_grad()
def record_ranges(model: nn.Module, batches: Iterable[Any], progress: bool = True) -> dict[str, dict[str, float]]:
    """Run `batches` through the exact model; the input ranges of each approximated step.

    Keys are site names relative to the base model; each attention also gets a
    `"<name>.score_probe"` entry with the largest |score|. Padded positions are ignored by the
    attention steps (multiplicative mask) but do reach the norms: pass unpadded blocks for the
    tightest domains.
    """
    base = model.base_model
    generator = torch.Generator().manual_seed(0)
    recorders: dict[str, RangeRecorder] = {}
    handles = []

    def watch(name: str, module: nn.Module, use_output: bool) -> None:
        recorders[name] = RangeRecorder(generator)
        if use_output:
            handles.append(module.register_forward_hook(lambda m, args, out: recorders[name].update(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, args: recorders[name].update(m.relevant(args[0]))))

    for name, op in approximated_ops(base).items():
        watch(name, op, use_output=False)
    for name, attention in score_scaled_attentions(base).items():
        watch(f"{name}.score_probe", attention.score_probe, use_output=True)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        with unscaled_exact(base):
            for batch in tqdm(batches, desc="calibrating", disable=not progress, unit="batch"):
                model(**_as_model_inputs(batch, device))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibration_data yielded no batches")
    return {name: recorder.summary() for name, recorder in recorders.items()}
