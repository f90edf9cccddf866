"""The examples run end to end on local text, and the CLI generates what `generate()` does."""

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_polyattn.cli import main as cli_main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *argv: str) -> None:
    saved = sys.argv
    sys.argv = [name, *argv]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    text = root / "text.txt"
    text.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 60)
    out = root / "model"
    run_example(
        "train_tiny.py", "--text", str(text), "--out", str(out), "--steps", "60", "--lr", "1e-2", "--hidden", "32",
        "--layers", "2", "--heads", "2", "--kv-heads", "1", "--vocab", "300", "--block", "32", "--batch", "8",
    )
    return out


def test_train_tiny_saves_a_loadable_model_that_learned(trained):
    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    ids = tokenizer("Shall I compare thee to a summer's day? Thou art more", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert loss < 0.7 * torch.log(torch.tensor(float(len(tokenizer)))), loss


def test_cli_generate_prints_what_generate_returns(trained, capsys):
    assert cli_main(["generate", "--model", str(trained), "Shall I", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    inputs = tokenizer("Shall I", return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert printed.strip() == tokenizer.decode(tokens[0], skip_special_tokens=True).strip()


def test_cli_info_describes_the_model(trained, capsys):
    assert cli_main(["info", "--model", str(trained)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"AutoModelForCausalLM\[PolyAttnConfig\] +-> PolyAttnForCausalLM", printed)
    assert "p=4" in printed and "form=sum" in printed


def test_lora_and_push_examples_run(trained, tmp_path):
    run_example("lora_finetune.py", "--model", str(trained), "--text", str(trained.parent / "text.txt"),
                "--out", str(tmp_path / "lora"), "--steps", "3", "--block", "32", "--rank", "2")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    run_example("push_to_hub.py", "--model", str(trained), "--dry-run", str(tmp_path / "hub"))
    assert (tmp_path / "hub" / "modeling_polyattn.py").is_file()
    assert (tmp_path / "hub" / "tokenizer.json").is_file()


def test_cli_rejects_bad_arguments(capsys):
    assert cli_main(["generate", "--model", "x", "hi", "--max-new-tokens", "0"]) == 2
    with pytest.raises(SystemExit):
        cli_main(["no-such-command"])


def test_cli_polynomialize_reports_saves_and_info_shows_it(trained, tmp_path, capsys):
    out = tmp_path / "poly"
    argv = ["polynomialize", "--model", str(trained), "--out", str(out), "--text", str(trained.parent / "text.txt")]
    assert cli_main(argv + ["--block", "32", "--blocks", "8", "--activation-degree", "12"]) == 0
    printed = capsys.readouterr().out
    assert "total multiplicative depth" in printed and "top-1 agreement" in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.is_polynomial and model.config.polynomial["calibrated"]
    assert model.config.polynomial["sites"]["layers.0.mlp.act_fn"]["degree"] == 12
    assert cli_main(["info", "--model", str(out)]) == 0
    info = capsys.readouterr().out
    assert "polynomial form: yes" in info and "layers.1.self_attn.reciprocal" in info


def test_cli_polynomialize_fits_the_ring_within_a_block_depth(trained, tmp_path, capsys):
    out = tmp_path / "fitted"
    argv = ["polynomialize", "--model", str(trained), "--out", str(out), "--text", str(trained.parent / "text.txt"),
            "--block", "32", "--blocks", "8"]
    assert cli_main(argv + ["--max-block-depth", "40"]) == 2  # a bound without the fit: refused before any work
    assert "needs --fit-ring" in capsys.readouterr().err and not out.exists()
    assert cli_main(argv + ["--fit-ring", "--max-block-depth", "40"]) == 0
    fit = AutoModelForCausalLM.from_pretrained(out).config.polynomial["fit"]
    assert fit["levels_per_refresh"] == 2 and fit["max_block_depth"] == 40


def test_train_default_model_script_saves_a_calibrated_polynomial_model(tmp_path, python_docs):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(python_docs)[:300_000])
    out = tmp_path / "default"
    run_example("train_default_model.py", "--text", str(text), "--out", str(out), "--steps", "20", "--hidden", "32", "--layers", "1")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.is_polynomial and model.config.polynomial["calibrated"]
    assert AutoTokenizer.from_pretrained(out)("import sys").input_ids  # the tokenizer came along
