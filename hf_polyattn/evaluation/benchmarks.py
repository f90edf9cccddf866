"""Zero- and few-shot benchmark scores: multiple choice by log-likelihood, LAMBADA by greedy match."""

from pathlib import Path

from .loglikelihood import bits_per_byte, score_continuations
from .tasks import GENERATIVE_TASKS, load_documents


def evaluate_task(
    model,
    tokenizer,
    task: str,
    limit: int | None = 500,
    batch_size: int = 16,
    max_length: int = 2048,
    tasks_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Score `model` on the first `limit` items of `task` (see `tasks.TASKS`).

    Multiple choice: `acc` (highest Σ log p of the answer) and `acc_norm` (highest Σ log p per
    character of the answer, olmo-eval's `acc_per_char`). LAMBADA: `acc` (the last word is the
    greedy continuation) and the `bits_per_byte` of the last words.
    """
    documents = load_documents(task, limit, tasks_dir)
    pairs = [pair for document in documents for pair in document.requests]
    scores = iter(score_continuations(model, tokenizer, pairs, batch_size, max_length, progress, description=task))
    if task in GENERATIVE_TASKS:
        hits, logprob, answers = 0, 0.0, ""
        for document in documents:
            score = next(scores)
            hits += score.greedy
            logprob += score.logprob
            answers += document.requests[0][1]
        # over all answers together (total bits / total bytes), as olmo-eval reports it
        return {"acc": hits / len(documents), "bits_per_byte": bits_per_byte(logprob, answers), "n": len(documents)}
    correct = correct_norm = 0
    for document in documents:
        choice_scores = [next(scores) for _ in document.requests]
        logprobs = [s.logprob for s in choice_scores]
        per_char = [s.logprob / max(1, len(continuation)) for s, (_, continuation) in zip(choice_scores, document.requests)]
        correct += max(range(len(logprobs)), key=logprobs.__getitem__) == document.gold
        correct_norm += max(range(len(per_char)), key=per_char.__getitem__) == document.gold
    return {"acc": correct / len(documents), "acc_norm": correct_norm / len(documents), "n": len(documents)}


def evaluate_tasks(model, tokenizer, tasks: list[str], **kwargs) -> dict[str, dict[str, float]]:
    """`evaluate_task` for each of `tasks`."""
    return {task: evaluate_task(model, tokenizer, task, **kwargs) for task in tasks}
