"""Every saved folder runs with `trust_remote_code=True` where hf_polyattn cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch


from hf_polyattn.cli import main as cli_main
from hf_polyattn.modeling.configuration_polyattn import AUTO_MAP
from tests.helpers import left_padded_batch, random_ids, save_tiny_llama, tiny_model

# modeling_polyattn.py and every same-folder module it imports, flattened next to the weights
CODE_FILES = (
    "modeling_polyattn.py",
    "configuration_polyattn.py",
    "power_softmax.py",
    "polynomial.py",
    "polynomial_form.py",
    "calibration.py",
)

REMOTE_LOAD = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_polyattn"] = None  # the package is not installed on the user's side
    try:
        import hf_polyattn
        raise SystemExit("hf_polyattn is still importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    folder, ids, mask = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), torch.tensor(json.loads(sys.argv[3]))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    print(json.dumps({
        "logits": logits.tolist(),
        "config": type(config).__module__ + "." + type(config).__name__,
        "model": type(model).__module__ + "." + type(model).__name__,
        "base": type(base).__name__,
        "polynomial": model.is_polynomial,
        "tokens": tokens.tolist(),
    }))
    """
)


def load_without_hf_polyattn(folder, ids, mask, tmp_path) -> dict:
    """Load `folder` in a fresh process that cannot import hf_polyattn; its classes, logits, tokens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder), json.dumps(ids.tolist()), json.dumps(mask.tolist())],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the repo root, so the source tree is not on sys.path either
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["config"].startswith("transformers_modules.") and loaded["config"].endswith("PolyAttnConfig")
    assert loaded["model"].startswith("transformers_modules.") and loaded["model"].endswith("PolyAttnForCausalLM")
    assert loaded["base"] == "PolyAttnModel"
    return loaded


@pytest.mark.parametrize("saved", ["causal_lm", "base_model"])
def test_every_save_writes_the_full_auto_map_and_the_code(tmp_path, saved):
    model = tiny_model() if saved == "causal_lm" else tiny_model().model
    model.save_pretrained(tmp_path)  # a plain save: no extra step to remember
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert set(AUTO_MAP) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    for name in CODE_FILES:
        assert (tmp_path / name).is_file(), name


@pytest.mark.parametrize("polynomial", [False, True], ids=["exact", "polynomial"])
def test_saved_folder_loads_in_a_process_without_hf_polyattn(tmp_path, polynomial):
    model = tiny_model()
    if polynomial:
        model.to_polynomial(calibration_data=[random_ids(4, 16, seed=s) for s in range(3)], progress=False)
    model.save_pretrained(tmp_path / "model")
    ids, mask = left_padded_batch([7, 4])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected_logits = model(ids, attention_mask=mask).logits

    loaded = load_without_hf_polyattn(tmp_path / "model", ids, mask, tmp_path)
    assert loaded["polynomial"] is polynomial
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected_logits, rtol=0, atol=1e-5)
    assert torch.equal(torch.tensor(loaded["tokens"]), expected)


def test_cli_converted_folder_loads_in_a_process_without_hf_polyattn(tmp_path):
    save_tiny_llama(tmp_path / "llama", "the quick brown fox jumps over the lazy dog " * 40)
    assert cli_main(["convert", "--from", str(tmp_path / "llama"), "--out", str(tmp_path / "poly")]) == 0

    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "poly").eval()
    ids, mask = left_padded_batch([9, 5])
    with torch.no_grad():
        expected_logits = converted(ids, attention_mask=mask).logits
    expected = converted.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)

    loaded = load_without_hf_polyattn(tmp_path / "poly", ids, mask, tmp_path)
    assert loaded["polynomial"] is False
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected_logits, rtol=0, atol=1e-5)
    assert torch.equal(torch.tensor(loaded["tokens"]), expected)
