"""Batched log-likelihood of continuations given contexts (the core of every benchmark here)."""

import math
from copy import deepcopy
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
    """`Score` of each (context, continuation) pair, running shared text once.

    Benchmarks repeat their text: the choices of an item share its context, and few-shot prompts
    share their worked examples across items (ARC-E 5-shot: ~150 of ~180 tokens). So:

    - the tokens that begin every pair run once, into a KV cache;
    - each pair's *head* runs from that cache, batched and left-padded behind it, with logits
      kept for the positions that predict continuation tokens. A pair's head is the whole pair
      but its last token, or, where choices share a context and running it once saves more
      tokens than their continuations hold (a bound on what padding them again can waste),
      that context, run once for all of them;
    - continuations after a shared context run last, from its cache, right-padded.

    The model needs a KV cache (`use_cache`). Scores equal one full forward per pair up to float
    rounding.
    """
    device = next(model.parameters()).device
    encoded = [encode_pair(tokenizer, c, x, max_length) for c, x in pairs]
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, length) in enumerate(encoded):
        by_context.setdefault(tuple(ids[:-length]), []).append(i)
    heads: dict[tuple[int, ...], list[int]] = {}  # head ids -> the pairs it serves
    for context, members in by_context.items():
        continuation_tokens = sum(encoded[i][1] for i in members)
        if (len(members) - 1) * len(context) > continuation_tokens:
            heads[context] = members
        else:
            for i in members:
                heads.setdefault(tuple(encoded[i][0][:-1]), []).append(i)
    unique = sorted(heads, key=len, reverse=True)
    # the logit of each context's last token scores its first continuation token: it stays in the heads
    shared = _common_prefix(unique)[: min(len(ids) - length for ids, length in encoded) - 1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix_cache = None
    if shared:
        prefix_cache = model(input_ids=torch.tensor([shared], device=device), use_cache=True, logits_to_keep=1).cache
    scores: list[Score | None] = [None] * len(encoded)

    def score(i: int, predicted: torch.Tensor) -> None:
        target = torch.tensor(encoded[i][0][-encoded[i][1] :], device=device)
        token_logprobs = predicted.gather(-1, target[:, None])[:, 0]
        scores[i] = Score(float(token_logprobs.sum()), len(target), bool((predicted.argmax(-1) == target).all()))

    batches = [unique[k : k + batch_size] for k in range(0, len(unique), batch_size)]
    for batch in tqdm(batches, desc=description, disable=not progress, unit="batch"):
        rests = [head[len(shared) :] for head in batch]
        width = max(map(len, rests))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), len(shared) + width), dtype=torch.long)
        mask[:, : len(shared)] = 1
        for row, rest in enumerate(rests):
            ids[row, width - len(rest) :] = torch.tensor(rest)
            mask[row, len(shared) + width - len(rest) :] = 1
        # a head's last `covered` positions predict continuation tokens (1 for a shared context)
        covered = {i: encoded[i][1] + 1 + len(head) - len(encoded[i][0]) for head in batch for i in heads[head]}
        keep = max(covered.values())
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    position_ids=(mask.cumsum(-1) - 1).clamp_min(0)[:, len(shared) :].to(device),
                    cache=_repeated(prefix_cache, len(batch)), use_cache=True, logits_to_keep=keep)
        log_probs = F.log_softmax(out.logits.float(), dim=-1)
        later = []  # (row, pair) whose continuation runs from the cache
        for row, head in enumerate(batch):
            for i in heads[head]:
                if covered[i] == encoded[i][1]:  # the head held the whole continuation
                    score(i, log_probs[row, keep - covered[i] :])
                else:
                    later.append((row, i))
        later.sort(key=lambda request: encoded[request[1]][1])  # similar lengths share a chunk: less padding
        for start in range(0, len(later), batch_size):
            chunk = later[start : start + batch_size]
            rows = [row for row, _ in chunk]
            inputs = [encoded[i][0][-encoded[i][1] : -1] for _, i in chunk]  # the last token predicts nothing scored
            longest = max(map(len, inputs))
            cont = torch.full((len(chunk), longest), pad, dtype=torch.long)
            cont_mask = torch.zeros_like(cont)
            for k, tokens in enumerate(inputs):
                cont[k, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                cont_mask[k, : len(tokens)] = 1
            row_mask = mask[rows]
            logits = model(
                input_ids=cont.to(device), attention_mask=torch.cat([row_mask, cont_mask], -1).to(device),
                position_ids=(row_mask.sum(-1, keepdim=True) + torch.arange(longest)).to(device),
                cache=_selected(out.cache, rows), use_cache=True,
            ).logits.float()
            cont_log_probs = F.log_softmax(logits, dim=-1)
            for k, (row, i) in enumerate(chunk):
                score(i, torch.cat([log_probs[row, -1:], cont_log_probs[k, : len(inputs[k])]]))
    return scores


def _common_prefix(sequences: list[tuple[int, ...]]) -> list[int]:
    first, last = min(sequences), max(sequences)  # the lexicographic extremes bound everyone's prefix
    length = next((k for k, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
    return list(first[:length])


def _repeated(cache, count: int):
    """A copy of a batch-1 `cache` with `count` rows (None stays None)."""
    if cache is None:
        return None
    copy = deepcopy(cache)
    copy.batch_repeat_interleave(count)
    return copy


def _selected(cache, rows: list[int]):
    """A copy of `cache` holding `rows` (repeats allowed), so the original serves the next chunk."""
    copy = deepcopy(cache)
    copy.batch_select_indices(torch.tensor(rows, device=copy.layers[0].keys.device))
    return copy


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
