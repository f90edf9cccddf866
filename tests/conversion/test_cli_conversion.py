"""`hf-polyattn convert`, `distill` and `eval` on a tiny Llama checkpoint saved in the test."""

import json

import torch
from transformers import AutoModelForCausalLM

from hf_polyattn import PolyAttnForCausalLM
from hf_polyattn.cli import main as cli_main
from hf_polyattn.evaluation.benchmarks import evaluate_task
from tests.helpers import save_tiny_llama
from tests.evaluation.test_benchmarks import mc_rows, write_task

TEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 50


def test_convert_distill_eval_from_the_command_line(tmp_path, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    llama, tokenizer = save_tiny_llama(tmp_path / "llama", TEXT, initializer_range=0.1)

    assert cli_main(["convert", "--from", str(tmp_path / "llama"), "--out", str(tmp_path / "poly"), "--power", "6"]) == 0
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "poly")
    assert isinstance(converted, PolyAttnForCausalLM) and converted.config.attn_power == 6
    for name, tensor in llama.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name

    argv = ["distill", "--teacher", str(tmp_path / "llama"), "--student", str(tmp_path / "poly"),
            "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "distilled"),
            "--steps", "4", "--batch-size", "4", "--block", "32", "--lr", "1e-3"]
    assert cli_main(argv) == 0
    distilled = AutoModelForCausalLM.from_pretrained(tmp_path / "distilled")
    moved = [n for n, t in distilled.state_dict().items() if not torch.equal(t, converted.state_dict()[n])]
    assert moved, "distillation changed no weight"

    docs = [("The quick brown", [" fox", " dog", " nine"], 0), ("A stitch in time saves", [" fox", " nine"], 1)]
    write_task(tmp_path / "tasks", "piqa", "rc_0shot", mc_rows(docs))
    capsys.readouterr()
    argv = ["eval", "--model", str(tmp_path / "distilled"), "--tasks", "piqa", "--limit", "2",
            "--tasks-dir", str(tmp_path / "tasks"), "--json", str(tmp_path / "scores.json")]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out.startswith("piqa")
    expected = evaluate_task(distilled.eval(), tokenizer, "piqa", 2, tasks_dir=tmp_path / "tasks", progress=False)
    assert json.loads((tmp_path / "scores.json").read_text())["piqa"] == expected
    assert cli_main(["eval", "--model", str(tmp_path / "distilled"), "--tasks", "nope"]) == 2
