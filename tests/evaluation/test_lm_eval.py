"""lm-evaluation-harness on a saved PolyAttn folder, over the shipped offline task YAMLs.

The reference is the project's own scorer (`score_continuations`, what `evaluate_task` sums):
lm-eval must give the same log-likelihood for every request of every item.
"""

import json

import pytest
import torch
import yaml

from hf_polyattn.cli import main as cli_main
from hf_polyattn.evaluation import harness
from hf_polyattn.evaluation.benchmarks import evaluate_task
from hf_polyattn.evaluation.loglikelihood import score_continuations
from hf_polyattn.evaluation.tasks import TASKS, load_documents


@pytest.fixture(scope="module")
def saved_tiny(trained_tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_for_lm_eval")
    trained_tiny.model.to_exact().save_pretrained(folder)
    trained_tiny.tokenizer.save_pretrained(folder)
    return folder, trained_tiny.model.eval(), trained_tiny.tokenizer


def test_one_shipped_yaml_per_task():
    names = {path.stem for path in harness.LM_EVAL_TASKS_DIR.glob("polyattn_*.yaml")}
    assert names == {harness.lm_eval_task_name(task) for task in TASKS}
    for path in harness.LM_EVAL_TASKS_DIR.glob("polyattn_*.yaml"):
        text = path.read_text().replace("!function", "")  # lm-eval's tag; plain YAML for this check
        assert yaml.safe_load(text)["task"] == path.stem
    assert set(harness.task_manager().all_tasks) >= names


@pytest.mark.parametrize("task", ["piqa", "winogrande", "arc_easy_5shot"])
def test_hflm_on_a_saved_folder_matches_our_scorer_item_by_item(saved_tiny, task):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    folder, model, tokenizer = saved_tiny
    limit = 6
    lm = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=4, device="cpu", max_length=2048)
    output = simple_evaluate(
        model=lm, tasks=[harness.lm_eval_task_name(task)], task_manager=harness.task_manager(), limit=limit,
        log_samples=True,
    )
    samples = sorted(output["samples"][harness.lm_eval_task_name(task)], key=lambda sample: sample["doc_id"])
    theirs = [response[0][0] for sample in samples for response in sample["resps"]]

    documents = load_documents(task, limit)
    pairs = [pair for document in documents for pair in document.requests]
    ours = [score.logprob for score in score_continuations(model, tokenizer, pairs, progress=False)]
    assert len(theirs) == len(ours) == sum(len(document.requests) for document in documents)
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), rtol=0, atol=1e-4)
    expected = evaluate_task(model, tokenizer, task, limit, progress=False)
    assert harness.lm_eval_scores(output)[task]["acc"] == pytest.approx(expected["acc"])


def test_cli_lm_eval_engine_prints_the_command_and_saves_the_scores(saved_tiny, capsys):
    folder, model, tokenizer = saved_tiny
    assert cli_main(["eval", "--engine", "lm-eval", "--model", str(folder), "--tasks", "piqa", "--limit", "4"]) == 0
    captured = capsys.readouterr()
    assert f"--include_path {harness.LM_EVAL_TASKS_DIR}" in captured.err
    assert f"pretrained={folder},trust_remote_code=True" in captured.err
    saved = json.loads((folder / harness.EVAL_RESULTS_FILE).read_text())
    expected = evaluate_task(model, tokenizer, "piqa", 4, progress=False)
    assert saved["piqa"]["engine"] == "lm-eval" and saved["piqa"]["n"] == 4
    assert saved["piqa"]["acc"] == pytest.approx(expected["acc"])
    assert cli_main(["eval", "--engine", "lm-eval", "--model", str(folder), "--tasks", "piqa", "--tasks-dir", "x"]) == 2
