"""`push_to_hub` uploads config, weights, code and a tagged model card (network calls faked)."""

from types import SimpleNamespace

import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError

from hf_polyattn.hub import HUB_TAGS, push_to_hub
from tests.helpers import tiny_model


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the Hub's network calls; record every file a commit would upload."""
    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            uploads[op.path_in_repo] = open(source, "rb").read() if isinstance(source, str) else source
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/0", oid="0", pr_url=None)

    def no_card(*args, **kwargs):
        raise EntryNotFoundError("no README.md in a new repo")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(no_card))
    return uploads


def test_push_uploads_weights_code_and_a_tagged_card(fake_hub):
    push_to_hub(tiny_model(), "someone/tiny-polyattn", tags=["shakespeare"])
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "modeling_polyattn.py",
        "configuration_polyattn.py",
        "power_softmax.py",
        "README.md",
    ):
        assert name in fake_hub, f"{name} was not uploaded: {sorted(fake_hub)}"
    card = fake_hub["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers"
    assert set(HUB_TAGS) | {"shakespeare"} <= set(metadata["tags"])
    assert b'"AutoModelForCausalLM": "modeling_polyattn.PolyAttnForCausalLM"' in fake_hub["config.json"]


def test_push_with_tokenizer_ships_the_secure_pipeline(fake_hub, tmp_path):
    from transformers import pipeline

    from hf_polyattn.assets import load_default_model

    model, tokenizer = load_default_model()
    push_to_hub(model, "someone/secure-polyattn", tokenizer=tokenizer)
    for name in ("pipelines.py", "secure_generation.py", "tokenizer.json", "modeling_polyattn.py"):
        assert name in fake_hub, f"{name} was not uploaded: {sorted(fake_hub)}"
    for name, content in fake_hub.items():
        (tmp_path / name).write_bytes(content)
    config = yaml.safe_load(fake_hub["config.json"])  # JSON is YAML
    assert config["custom_pipelines"]["secure-text-generation"]["impl"] == "pipelines.SecureTextGenerationPipeline"
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("secure-text-generation", model=str(tmp_path))
    pipe = pipeline("secure-text-generation", model=str(tmp_path), trust_remote_code=True)
    assert type(pipe).__name__ == "SecureTextGenerationPipeline"


def test_push_puts_saved_eval_results_in_the_card_model_index(fake_hub, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_polyattn.evaluation.harness import save_eval_results

    tiny_model().save_pretrained(tmp_path)
    save_eval_results(tmp_path, {"piqa": {"acc": 0.5, "acc_norm": 0.625, "n": 8}}, engine="builtin")
    save_eval_results(tmp_path, {"lambada": {"acc": 0.25, "bits_per_byte": 1.5, "n": 4}}, engine="lm-eval")
    push_to_hub(AutoModelForCausalLM.from_pretrained(tmp_path), "someone/scored-polyattn")

    metadata = yaml.safe_load(fake_hub["README.md"].decode().split("---")[1])
    (entry,) = metadata["model-index"]
    assert entry["name"] == "scored-polyattn"
    scores = {
        (result["dataset"]["type"], metric["type"]): metric["value"]
        for result in entry["results"]
        for metric in result["metrics"]
    }
    assert scores == {("piqa", "acc"): 0.5, ("piqa", "acc_norm"): 0.625, ("lambada", "acc"): 0.25, ("lambada", "bits_per_byte"): 1.5}


def test_push_without_eval_results_writes_no_model_index(fake_hub):
    push_to_hub(tiny_model(), "someone/unscored")
    assert "model-index" not in yaml.safe_load(fake_hub["README.md"].decode().split("---")[1])
