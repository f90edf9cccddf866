"""Batched log-likelihood of continuations given contexts (the core of every benchmark here)."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils.logging import tqdm


@dataclass
class Score:
    """How a model scores one (context, continuation) pair."""

    logprob: float  # Σ log p(continuation tokens | context)
    tokens: int  # continuation tokens
    greedy: bool  # every continuation token is the argmax prediction


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of context + continuation (left-truncated to `max_length`) and the continuation length.

    As in lm-evaluation-harness, the two are tokenised separately, with the context's trailing
    spaces moved to the continuation, so the continuation's tokens do not depend on the context.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    context_ids = tokenizer(stripped).input_ids if stripped else []
    if not context_ids and tokenizer.bos_token_id is not None:
        context_ids = [tokenizer.bos_token_id]
    continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    if not continuation_ids:
        raise ValueError(f"empty continuation after tokenisation: {continuation!r}")
    ids = (context_ids + continuation_ids)[-max_length:]
    if len(ids) <= len(continuation_ids):
        raise ValueError(f"a continuation of {len(continuation_ids)} tokens leaves no context within {max_length}")
    return ids, len(continuation_ids)


@torch.no_grad()
def score_continuations(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    batch_size: int = 16,
    max_length: int = 2048,
    progress: bool = True,
    description: str = "scoring",
) -> list[Score]:
    """`Score` of each (context, continuation) pair, batched by length with left padding.

    Left padding puts every continuation at the end of its row, so only the last
    `max continuation + 1` positions need logits.
    """
    device = next(model.parameters()).device
    encoded = [encode_pair(tokenizer, c, x, max_length) for c, x in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores: list[Score | None] = [None] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=description, disable=not progress, unit="batch"):
        width = max(len(encoded[i][0]) for i in batch)
        keep = max(encoded[i][1] for i in batch) + 1
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            tokens = encoded[i][0]
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=position_ids.to(device),
            logits_to_keep=keep,
        ).logits.float()
        log_probs = F.log_softmax(logits, dim=-1)
        for row, i in enumerate(batch):
            length = encoded[i][1]
            target = ids[row, width - length :].to(device)
            predicted = log_probs[row, keep - length - 1 : keep - 1]  # position t predicts token t + 1
            token_logprobs = predicted.gather(-1, target[:, None])[:, 0]
            greedy = bool((predicted.argmax(-1) == target).all())
            scores[i] = Score(float(token_logprobs.sum()), length, greedy)
    return scores


def bits_per_byte(logprob: float, text: str) -> float:
    """Negative log-likelihood in bits per UTF-8 byte of `text`."""
    return -logprob / math.log(2) / max(1, len(text.encode("utf-8")))


@torch.no_grad()
def text_bits_per_byte(model, tokenizer, text: str, block_size: int = 512, progress: bool = True) -> float:
    """Bits per byte of `text`, scored in consecutive blocks of `block_size` tokens."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < 2:
        raise ValueError("text too short to score")
    device = next(model.parameters()).device
    total = 0.0
    starts = range(0, len(ids) - 1, block_size)
    for start in tqdm(starts, desc="bits per byte", disable=not progress, unit="block"):
        block = torch.tensor(ids[start : start + block_size + 1], device=device)[None]
        logits = model(input_ids=block[:, :-1]).logits.float()
        total += float(F.log_softmax(logits, -1).gather(-1, block[:, 1:, None]).sum())
    # the first token is never predicted: count the bytes of what was scored
    scored_text = tokenizer.decode(ids[1:])
    return bits_per_byte(total, scored_text)
