"""In-context-learning and inductive-bias probes: associative recall, induction copying, locality.

They run on any causal LM whose forward takes `input_ids` (PolyAttn or a stock softmax model), and
need no data files: the sequences are synthetic, drawn from a seeded generator.

- Associative recall (multi-query, as in Zoology's MQAR): `k1 v1 … kn vn` then the keys again in
  another order, each to be followed by its value. Models are trained on it
  (`associative_recall_blocks`) and scored by `associative_recall_accuracy` at several `n`.
- Induction copying: a random token sequence, then the same sequence again. A model with induction
  heads predicts the repeat from context; the first half is at chance. Works on any pretrained LM.
- Attention locality: per layer, the mean distance `Σ_j w_ij (i − j)` from a query to the keys it
  attends to, and the entropy of its weights (rows renormalised to sum to 1).
"""

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def associative_recall_blocks(
    count: int, num_pairs: int, vocab_size: int, seed: int = 0, first_id: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` recall sequences of `4 · num_pairs` tokens and their labels.

    Keys come from the lower half of `[first_id, vocab_size)` and values from the upper half, so a
    token's role is visible. Each sequence holds `num_pairs` distinct keys with random values, then
    the same keys shuffled, each followed by its value. Labels are the values at the positions
    that predict them (the query keys) and `-100` elsewhere, so the LM loss trains recall only.
    """
    span = (vocab_size - first_id) // 2
    if num_pairs < 1 or num_pairs > span:
        raise ValueError(f"num_pairs must be in [1, {span}] for vocab_size={vocab_size}, got {num_pairs}")
    generator = _generator(seed)
    keys = torch.rand(count, span, generator=generator).argsort(-1)[:, :num_pairs] + first_id
    values = torch.randint(first_id + span, first_id + 2 * span, (count, num_pairs), generator=generator)
    order = torch.rand(count, num_pairs, generator=generator).argsort(-1)
    context = torch.stack([keys, values], -1).reshape(count, -1)
    queries = torch.stack([keys.gather(1, order), values.gather(1, order)], -1).reshape(count, -1)
    ids = torch.cat([context, queries], 1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 2 * num_pairs + 1 :: 2] = ids[:, 2 * num_pairs + 1 :: 2]  # a value, predicted from its key
    return ids, labels


def _next_token_hits(model, ids: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[int, int]:
    """(correct argmax predictions, scored positions) where `labels` is not ignored; labels are
    aligned with `ids` (the prediction for position t comes from the logits at t − 1)."""
    correct = total = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size].to(device)
            target = labels[start : start + batch_size, 1:].to(device)
            predicted = model(input_ids=batch).logits[:, :-1].argmax(-1)
            scored = target != IGNORE_INDEX
            correct += int((predicted == target)[scored].sum())
            total += int(scored.sum())
    return correct, total


def associative_recall_accuracy(
    model, num_pairs: int, vocab_size: int, count: int = 256, seed: int = 10_000, batch_size: int = 64
) -> float:
    """The fraction of queried values a model predicts (argmax) in fresh recall sequences."""
    ids, labels = associative_recall_blocks(count, num_pairs, vocab_size, seed)
    correct, total = _next_token_hits(model, ids, labels, batch_size)
    return correct / total


@dataclass
class InductionScore:
    """Next-token accuracy on a random sequence (`first`, chance level) and on its repeat (`repeat`)."""

    length: int
    first: float
    repeat: float


def induction_copy_accuracy(
    model, vocab_size: int, length: int, count: int = 32, seed: int = 20_000, first_id: int = 4, batch_size: int = 16
) -> InductionScore:
    """In-context copying: random tokens of `length`, repeated once; accuracy in each half."""
    if length < 2:
        raise ValueError(f"length must be >= 2, got {length}")
    half = torch.randint(first_id, vocab_size, (count, length), generator=_generator(seed))
    ids = torch.cat([half, half], 1)
    first = torch.full_like(ids, IGNORE_INDEX)
    first[:, 1:length] = ids[:, 1:length]
    repeat = torch.full_like(ids, IGNORE_INDEX)
    repeat[:, length + 1 :] = ids[:, length + 1 :]  # the repeat's first token is not yet predictable
    first_hits, first_total = _next_token_hits(model, ids, first, batch_size)
    repeat_hits, repeat_total = _next_token_hits(model, ids, repeat, batch_size)
    return InductionScore(length, first_hits / first_total, repeat_hits / repeat_total)


@dataclass
class LayerLocality:
    """Mean over heads and queries of one layer's attention distance and entropy (nats)."""

    layer: int
    mean_distance: float
    entropy: float


def attention_locality(model, ids: torch.Tensor) -> list[LayerLocality]:
    """Attention distance and entropy per layer on `ids` (a batch without padding).

    The model must return attention weights (`output_attentions=True`): PolyAttn always can; a
    stock softmax model needs `attn_implementation="eager"`. Rows are renormalised to sum to 1
    (a Power-Softmax row sums to `S/(eps+S)`, slightly below 1).
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        attentions = model(input_ids=ids.to(device), output_attentions=True).attentions
    if not attentions or attentions[0] is None:
        raise ValueError("the model returned no attention weights: load it with attn_implementation='eager'")
    length = ids.shape[1]
    positions = torch.arange(length, device=device, dtype=torch.float32)
    distance = (positions[:, None] - positions[None, :]).clamp_min(0)  # (query, key)
    results = []
    for layer, weights in enumerate(attentions):
        weights = weights.float()
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
        mean_distance = (weights * distance).sum(-1).mean()
        entropy = -(weights * weights.clamp_min(1e-30).log()).sum(-1).mean()
        results.append(LayerLocality(layer, float(mean_distance), float(entropy)))
    return results


__all__ = [
    "InductionScore",
    "LayerLocality",
    "associative_recall_accuracy",
    "associative_recall_blocks",
    "attention_locality",
    "induction_copy_accuracy",
]
