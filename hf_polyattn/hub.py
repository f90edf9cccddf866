"""Sharing PolyAttn models on the Hub so others load them with `trust_remote_code=True`.

Every PolyAttn `save_pretrained` (and so every push) ships the model code and the full
`auto_map` by itself (`modeling/configuration_polyattn.AUTO_MAP`); `push_to_hub` here adds the
tags, the secure pipeline when a tokenizer comes along, and the model's evaluation results as
the card's `model-index`.
"""

import json
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi
from transformers import PreTrainedModel
from transformers.utils.hub import create_and_tag_model_card

from .evaluation.harness import EVAL_RESULTS_FILE
from .modeling import PolyAttnForCausalLM, PolyAttnModel

HUB_TAGS = ["polyattn", "power-softmax", "polynomial-llm", "ckks", "homomorphic-encryption"]


def card_eval_results(results: dict[str, dict[str, Any]]) -> list[EvalResult]:
    """`{task: {metric: value}}` (what `hf-polyattn eval` saves) as the card's model-index entries."""
    entries = []
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if metric in ("n", "engine") or not isinstance(value, (int, float)):
                continue
            entries.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=task,
                    dataset_split="validation",
                    metric_type=metric,
                    metric_value=float(value),
                    # the card's display name says how it was measured (the Hub wants a URL with a source)
                    metric_name=f"{metric} ({metrics.get('n', '?')} items, {metrics.get('engine', 'builtin')} engine)",
                )
            )
    return entries


def _saved_eval_results(model: PreTrainedModel) -> dict[str, dict[str, Any]] | None:
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    path = folder / EVAL_RESULTS_FILE
    return json.loads(path.read_text()) if str(folder) and path.is_file() else None


def push_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    tokenizer=None,
    tags: list[str] | None = None,
    eval_results: dict[str, dict[str, Any]] | None = None,
    commit_message: str = "Upload PolyAttn model",
    private: bool | None = None,
    token: str | None = None,
):
    """Push a PolyAttn model (code, weights, config, a tagged card) in one commit.

    With a tokenizer, the tokenizer and the `secure-text-generation` pipeline go too (its code and
    the config's `custom_pipelines`), so `pipeline(task, model=repo_id, trust_remote_code=True)`
    works. `eval_results` (`{task: {metric: value}}`, default: the `eval_results.json` that
    `hf-polyattn eval` left in the folder the model was loaded from) become the card's
    `model-index`, which the Hub shows as the model's scores.
    """
    if not isinstance(model, (PolyAttnForCausalLM, PolyAttnModel)):
        raise TypeError(f"expected a PolyAttn model, got {type(model).__name__}")
    all_tags = HUB_TAGS + [tag for tag in tags or [] if tag not in HUB_TAGS]
    eval_results = eval_results if eval_results is not None else _saved_eval_results(model)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    card = create_and_tag_model_card(repo_id, all_tags, token=token)
    if eval_results:
        card.data.model_name = card.data.model_name or repo_id.split("/")[-1]
        card.data.eval_results = card_eval_results(eval_results)
    if tokenizer is None:
        saved = model
    else:
        from .pipelines import SecureTextGenerationPipeline

        saved = SecureTextGenerationPipeline(model=model, tokenizer=tokenizer)
    with tempfile.TemporaryDirectory() as folder:
        saved.save_pretrained(folder)
        card.save(Path(folder) / "README.md")
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
