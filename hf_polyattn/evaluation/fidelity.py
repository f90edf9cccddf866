"""How far a model is from a reference on given text: its polynomial form from its exact form, a
student from its teacher."""

import math

import torch
from transformers.utils.logging import tqdm

from ..training.distill import distillation_kl


@torch.no_grad()
def polynomial_fidelity(model, blocks: torch.Tensor, batch_size: int = 16, progress: bool = False) -> dict[str, float]:
    """Exact vs polynomial form (the model's current polynomial description) over token `blocks`.

    Returns perplexity in both forms, next-token top-1 agreement, and max / mean |Δlogit|. The
    model must have been put in polynomial form once (`to_polynomial`); it is left in that form.
    """
    if not model.config.polynomial:
        raise ValueError("the model has no polynomial description: call model.to_polynomial(...) first")
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (n, length >= 2) token ids, got shape {tuple(blocks.shape)}")
    sums = {"exact_nll": 0.0, "poly_nll": 0.0, "agree": 0, "max_dlogit": 0.0, "sum_dlogit": 0.0}
    for batch in tqdm(blocks.split(batch_size), desc="exact vs polynomial", disable=not progress):
        exact = model.to_exact()(batch, labels=batch)
        poly = model.to_polynomial(progress=False)(batch, labels=batch)
        predicted = batch[:, 1:].numel()
        sums["exact_nll"] += float(exact.loss) * predicted
        sums["poly_nll"] += float(poly.loss) * predicted
        sums["agree"] += int((exact.logits.argmax(-1) == poly.logits.argmax(-1)).sum())
        # a NaN logit is an infinite difference (Python's max would silently skip it)
        delta = (exact.logits - poly.logits).abs().nan_to_num(nan=float("inf"))
        sums["max_dlogit"] = max(sums["max_dlogit"], float(delta.max()))
        sums["sum_dlogit"] += float(delta.mean()) * batch.numel()
    predicted = blocks.shape[0] * (blocks.shape[1] - 1)
    return {
        "ppl_exact": math.exp(sums["exact_nll"] / predicted),
        "ppl_poly": math.exp(sums["poly_nll"] / predicted),
        "top1_agreement": sums["agree"] / blocks.numel(),
        "max_dlogit": sums["max_dlogit"],
        "mean_dlogit": sums["sum_dlogit"] / blocks.numel(),
    }


@torch.no_grad()
def held_out_kl_and_perplexity(model, teacher, blocks: torch.Tensor, batch_size: int = 4) -> dict[str, float]:
    """Mean KL(teacher ‖ model) per token and the model's perplexity on held-out token blocks."""
    kl = nll = 0.0
    device = next(model.parameters()).device
    for batch in blocks.split(batch_size):
        batch = batch.to(device)
        output = model(batch, labels=batch)
        kl += float(distillation_kl(output.logits, teacher(batch).logits)) * len(batch)
        nll += float(output.loss) * len(batch)
    finite = math.isfinite(nll)
    return {"kl": kl / len(blocks), "perplexity": math.exp(nll / len(blocks)) if finite else float("nan")}
