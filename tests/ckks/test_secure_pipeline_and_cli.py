"""The user-facing entry points of secure generation, on the embedded default model."""

import pytest
import torch
from transformers import pipeline

from hf_polyattn.assets import DEFAULT_MODEL_DIR, load_default_model
from hf_polyattn.cli import main
from tests.helpers import tiny_model

PROMPT = "KING"


@pytest.fixture(scope="module")
def default_model():
    return load_default_model()


@pytest.fixture(scope="module")
def plaintext_continuation(default_model):
    model, tokenizer = default_model
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_embedded_default_model_is_small_calibrated_and_polynomial(default_model):
    model, tokenizer = default_model
    size = sum(path.stat().st_size for path in DEFAULT_MODEL_DIR.iterdir())
    assert size < 3_000_000, f"the embedded model takes {size / 1e6:.1f} MB"
    assert model.is_polynomial and model.config.polynomial["calibrated"]
    assert len(tokenizer) == model.config.vocab_size


def test_pipeline_generates_the_plaintext_text_with_a_latency_report(default_model, plaintext_continuation):
    model, tokenizer = default_model
    pipe = pipeline("secure-text-generation", model=model, tokenizer=tokenizer)
    record = pipe(PROMPT, max_new_tokens=2, do_sample=False)[0]
    assert record["generated_text"] == plaintext_continuation
    report = record["latency_report"]
    assert "| refresh |" in report and "| pt×ct matmul |" in report and "prefill" in report


def test_cli_generate_secure_streams_the_text_and_the_breakdown(capsys, plaintext_continuation):
    # on a 42-bit scale (what the shipped SmolLM2's normaliser needs): the same tokens
    assert main(["generate", "--secure", PROMPT, "--max-new-tokens", "2", "--scale-bits", "42"]) == 0
    captured = capsys.readouterr()
    assert plaintext_continuation in captured.out
    assert "| reciprocal |" in captured.out and "bytes to the client" in captured.out
    assert "scale 2^42" in captured.err


def test_cli_generate_secure_refuses_an_exact_model_naming_the_step(tmp_path, capsys, default_model):
    _, tokenizer = default_model
    tiny_model(vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["generate", "--secure", "--model", str(tmp_path), PROMPT]) == 2
    assert "to_polynomial" in capsys.readouterr().err
