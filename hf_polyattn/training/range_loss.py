"""Range loss: keep fine-tuning inside the calibrated polynomial domains."""

from typing import Any

import torch
from torch import nn

from ..modeling import PolyAttnModel
from ..modeling.polynomial_form import approximated_ops, score_scaled_attentions
from .autocast import UnwrapsAfterTraining


def polyattn_base(model: nn.Module) -> PolyAttnModel:
    """The `PolyAttnModel` inside `model` (itself, a causal LM, or a PEFT wrapper of one)."""
    for module in model.modules():
        if isinstance(module, PolyAttnModel):
            return module
    raise TypeError(f"{type(model).__name__} contains no PolyAttnModel")


def _excess(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Mean squared distance outside [low, high], in units of the domain's width."""
    x = x.float()
    outside = torch.relu(low - x) + torch.relu(x - high)
    return (outside / (high - low)).pow(2).mean()


class RangeLoss:
    """A penalty on the inputs of approximated steps that leave their calibrated domains.

    Watches, with forward hooks, the inputs of the norms' inverse square roots and the MLP
    activations, and the attention scores against the layer's `score_scale` (|score| ≤ C keeps
    the reciprocal's input bounded). The reciprocal's own input is not penalised: in training
    its units follow the data-dependent stable scaling.

        range_loss = RangeLoss(model, weight=0.1)       # after calibration (to_polynomial + to_exact)
        loss = model(**batch).loss + range_loss.pop()   # pop() returns and resets the penalty

    Use it as a context manager, or call `remove()`, to take the hooks off.
    """

    def __init__(self, model: nn.Module, weight: float = 1.0):
        spec = model.config.polynomial
        if not spec or not spec.get("calibrated"):
            raise ValueError("RangeLoss needs calibrated domains: run model.to_polynomial(calibration_data=...) first")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight = weight
        self._terms: list[torch.Tensor] = []
        self._handles = []
        base = polyattn_base(model)
        sites = spec["sites"]
        for name, op in approximated_ops(base).items():
            if op.kind in ("inv_sqrt", "activation"):
                low, high = sites[name]["domain"]
                self._handles.append(op.register_forward_pre_hook(self._input_hook(low, high)))
        for name, attention in score_scaled_attentions(base).items():
            scale = sites[name]["score_scale"]
            self._handles.append(attention.score_probe.register_forward_hook(self._scores_hook(scale)))

    def _input_hook(self, low: float, high: float):
        def hook(module, args):
            self._terms.append(_excess(args[0], low, high))

        return hook

    def _scores_hook(self, scale: float):
        def hook(module, args, output):
            self._terms.append(_excess(output, -scale, scale))

        return hook

    def pop(self) -> torch.Tensor:
        """The weighted penalty accumulated since the last call (0 if nothing ran)."""
        total = torch.stack(self._terms).sum() if self._terms else torch.zeros(())
        self._terms = []
        return self.weight * total

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class RangeLossTrainer(UnwrapsAfterTraining):
    """`Trainer` whose loss adds `range_loss_weight ×` the `RangeLoss` of the model being trained."""

    def __init__(self, *args, range_loss_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.range_loss = RangeLoss(self.model, range_loss_weight)

    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, **kwargs):
        self.range_loss.pop()  # drop anything left from an evaluation pass
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        loss = loss + self.range_loss.pop().to(loss.device)
        return (loss, outputs) if return_outputs else loss
