"""In-context episodes built from running text: distillation text with few-shot structure.

Distilling on running text (plays, encyclopedia paragraphs) recovers a converted model's
zero-shot scores but not its in-context learning: nothing in such text rewards looking back at
earlier examples of a format. An *episode* here is one made-up task shown several times in a row
("Question: <a sentence without its last word>\\nAnswer: <that word>", a key–value list then
queries into it, …), each example built from the training text itself, so the teacher's logits
at every answer carry what it learnt from the examples before it. No benchmark data is used.
"""

import random
import re
from collections.abc import Callable, Iterable

from .data import text_blocks

# the label pairs an episode uses for its inputs and outputs (one pair per episode)
LABELS = (("Q:", "A:"), ("Question:", "Answer:"), ("Input:", "Output:"), ("Text:", "Answer:"),
          ("Sentence:", "Answer:"))
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[A-Za-z]$")


def sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The sentences of `text` (split after . ! ?) with their whitespace collapsed, keeping those of
    `min_words` to `max_words` words whose last word is a plain word (the cloze tasks' answers)."""
    kept = []
    for raw in _SENTENCE_END.split(text):
        sentence = " ".join(raw.split())
        words = sentence.split(" ")
        if min_words <= len(words) <= max_words and _WORD.match(words[-1].rstrip(".!?")):
            kept.append(sentence)
    return kept


def _last_word(rng: random.Random, pool: list[str], index: int) -> tuple[str, str]:
    words = pool[index].split(" ")
    return " ".join(words[:-1]), words[-1].rstrip(".!?")


def _next_sentence(rng: random.Random, pool: list[str], index: int) -> tuple[str, str]:
    index = min(index, len(pool) - 2)
    return pool[index], pool[index + 1]


def _blank(rng: random.Random, pool: list[str], index: int) -> tuple[str, str]:
    words = pool[index].split(" ")
    choices = [i for i, word in enumerate(words) if _WORD.match(word) and len(word) > 3] or [len(words) - 1]
    pick = rng.choice(choices)
    answer = words[pick].rstrip(".!?,;:")
    return " ".join(words[:pick] + ["___"] + words[pick + 1:]), answer


def _span(rng: random.Random, pool: list[str], index: int, low: int = 3, high: int = 6) -> list[str]:
    words = [word.strip(".,;:!?\"'()") for word in pool[index].split(" ")]
    words = [word for word in words if word]
    length = min(len(words), rng.randint(low, high))
    start = rng.randrange(len(words) - length + 1)
    return words[start : start + length]


def _uppercase(rng: random.Random, pool: list[str], index: int) -> tuple[str, str]:
    span = " ".join(_span(rng, pool, index))
    return span, span.upper()


def _reverse(rng: random.Random, pool: list[str], index: int) -> tuple[str, str]:
    span = _span(rng, pool, index)
    return " ".join(span), " ".join(reversed(span))


def _first_word(rng: random.Random, pool: list[str], index: int) -> tuple[str, str]:
    return pool[index], pool[index].split(" ")[0].strip(".,;:!?\"'()")


# task name → (instruction line, make one (input, output) example from the sentence pool)
TASKS: dict[str, tuple[str, Callable]] = {
    "last_word": ("Complete each passage with its last word.", _last_word),
    "next_sentence": ("Continue each sentence with the one that follows it.", _next_sentence),
    "blank": ("Fill in the blank.", _blank),
    "uppercase": ("Write each phrase in capital letters.", _uppercase),
    "reverse": ("Reverse the order of the words.", _reverse),
    "first_word": ("Give the first word of each sentence.", _first_word),
    "recall": ("Look up each key in the list.", None),  # a key-value list, then queries into it
}


def _recall_episode(rng: random.Random, pool: list[str], labels: tuple[str, str], max_chars: int) -> str:
    words = sorted({word.lower() for sentence in rng.sample(pool, min(len(pool), 40)) for word in sentence.split(" ")
                    if _WORD.match(word) and len(word) > 3})
    keys = rng.sample(words, min(len(words), rng.randint(6, 16)))
    values = {key: str(rng.randint(10, 999)) for key in keys}
    lines = [TASKS["recall"][0], ""] + [f"{key}: {value}" for key, value in values.items()] + [""]
    while len("\n".join(lines)) < max_chars:
        key = rng.choice(keys)
        lines += [f"{labels[0]} {key}", f"{labels[1]} {values[key]}", ""]
    return "\n".join(lines).strip()


def fewshot_episodes(texts: Iterable[str], count: int, max_chars: int = 2000, seed: int = 0,
                     tasks: Iterable[str] = tuple(TASKS)) -> list[str]:
    """`count` episodes, each one task of `tasks` (in turn) shown as examples from `texts` until
    the episode reaches about `max_chars` characters (≈ 500 SmolLM2 tokens at 2000), under an
    instruction line half of the time. Deterministic for a given `seed`.

    Pass training text only: the episodes copy its sentences."""
    tasks = list(tasks)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown few-shot tasks {sorted(unknown)}; available: {sorted(TASKS)}")
    if count < 1 or max_chars < 200:
        raise ValueError(f"need count >= 1 and max_chars >= 200, got {count} and {max_chars}")
    pool = [sentence for text in texts for sentence in sentences(text)]
    if len(pool) < 50:
        raise ValueError(f"the texts hold {len(pool)} usable sentences; few-shot episodes need at least 50")
    rng = random.Random(seed)
    episodes = []
    for number in range(count):
        task = tasks[number % len(tasks)]
        labels = rng.choice(LABELS)
        if task == "recall":
            episodes.append(_recall_episode(rng, pool, labels, max_chars))
            continue
        instruction, make = TASKS[task]
        lines = [instruction, ""] if rng.random() < 0.5 else []
        index = rng.randrange(len(pool) - 1)
        while len("\n".join(lines)) < max_chars:
            source, answer = make(rng, pool, index)
            lines += [f"{labels[0]} {source}", f"{labels[1]} {answer}", ""]
            index = (index + rng.randint(1, 50)) % (len(pool) - 1)
        episodes.append("\n".join(lines).strip())
    return episodes


def fewshot_blocks(tokenizer, texts: Iterable[str], block_size: int, episodes: int, seed: int = 0):
    """`episodes` in-context episodes of `texts` (see `fewshot_episodes`), tokenised and packed into
    `block_size` blocks like running text (`data.text_blocks`): the GPU run's inputs and the CPU
    recipe's distillation both take their episodes from here."""
    return text_blocks(tokenizer, fewshot_episodes(texts, episodes, seed=seed), block_size)


def episodes_for_share(share: float, text_chars: int, max_chars: int = 2000) -> int:
    """How many episodes of about `max_chars` characters make `share` of a mix with `text_chars`
    characters of running text (an episode runs ≈ 1.2 × max_chars: it stops after the example that
    crosses it; its characters per token are about running text's)."""
    if not 0 <= share < 1:
        raise ValueError(f"the few-shot share must be in [0, 1), got {share}")
    return round(share / (1 - share) * text_chars / (1.2 * max_chars))
