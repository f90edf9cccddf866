"""Sharing: the saved folder runs with `trust_remote_code=True` where hf_polyattn is not installed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_polyattn.hub import AUTO_MAP, enable_remote_code
from tests.helpers import left_padded_batch, random_ids, tiny_model

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
    print(json.dumps({
        "config": type(config).__module__ + "." + type(config).__name__,
        "model": type(model).__module__ + "." + type(model).__name__,
        "base": type(base).__name__,
        "polynomial": model.is_polynomial,
        "tokens": tokens.tolist(),
    }))
    """
)


def test_save_writes_auto_map_and_code(tmp_path):
    model = enable_remote_code(tiny_model())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert set(AUTO_MAP) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    for name in CODE_FILES:
        assert (tmp_path / name).is_file(), name


@pytest.mark.parametrize("polynomial", [False, True], ids=["exact", "polynomial"])
def test_remote_code_load_in_fresh_process_generates_the_same_tokens(tmp_path, polynomial):
    model = tiny_model()
    if polynomial:
        model.to_polynomial(calibration_data=[random_ids(4, 16, seed=s) for s in range(3)], progress=False)
    enable_remote_code(model)
    model.save_pretrained(tmp_path / "model")
    ids, mask = left_padded_batch([7, 4])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "model"), json.dumps(ids.tolist()), json.dumps(mask.tolist())],
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
    assert loaded["polynomial"] is polynomial
    assert torch.equal(torch.tensor(loaded["tokens"]), expected)
