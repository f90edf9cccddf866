"""Every source family's weight map loses nothing and runs the same Power-Softmax model.

For each tiny random source model: the converted weights mapped back into the stock class give
the source logits exactly, and the stock class run with `attn_implementation="power_softmax"`
gives the converted PolyAttn model's logits.
"""

import copy

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_polyattn import PolyAttnForCausalLM
from hf_polyattn.ckks import SecureSession
from hf_polyattn.conversion.convert import convert_checkpoint, export_weights
from hf_polyattn.conversion.families import supported_model_types
from tests.conversion.test_convert_and_distill import _distill, _held_out_kl
from tests.helpers import VOCAB, left_padded_batch, random_ids

ATTENTION = dict(attn_power=4, attn_eps=1e-6, attn_form="sum")
TOKENS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def llama(tie: bool = False):
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.15, tie_word_embeddings=tie, rope_theta=5000.0, **TOKENS,
    ))


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        initializer_range=0.15, **TOKENS,
    ))


def gpt_neox(parallel: bool = True):
    config = GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.15,
        use_parallel_residual=parallel, rotary_pct=0.5, **TOKENS,
    )
    return GPTNeoXForCausalLM(config)


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.15, **TOKENS))


def gemma():
    return GemmaForCausalLM(GemmaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, initializer_range=0.15, **TOKENS,
    ))


def gemma3():
    # sliding window 32 > every sequence here, where Gemma's local layers and PolyAttn's agree
    return Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=12, initializer_range=0.15, sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
        **TOKENS,
    ))


SOURCES = {
    "llama": llama,
    "llama_tied": lambda: llama(tie=True),
    "qwen2": qwen2,
    "gpt_neox_parallel": gpt_neox,
    "gpt_neox_sequential": lambda: gpt_neox(parallel=False),
    "gpt2": gpt2,
    "gemma": gemma,
    "gemma3": gemma3,
}


def build(name: str):
    torch.manual_seed(0)
    model = SOURCES[name]().eval()
    with torch.no_grad():  # biases and norm shifts start at 0: make them matter to the maps
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("bias") or "norm" in parameter_name or ".ln_" in parameter_name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("name", SOURCES)
def test_weight_map_loses_nothing_and_matches_stock_power_softmax(name):
    source = build(name)
    converted = convert_checkpoint(source, **ATTENTION)
    assert isinstance(converted, PolyAttnForCausalLM)
    ids, mask = left_padded_batch([9, 6])
    with torch.no_grad():
        reference = source(ids, attention_mask=mask).logits
        # converted weights back in the stock class: the source logits, exactly
        back = type(source)(copy.deepcopy(source.config)).eval()
        back.load_state_dict(export_weights(converted, source.config), strict=True)
        assert torch.equal(back(ids, attention_mask=mask).logits, reference)
        # the stock class with Power-Softmax is the PolyAttn model
        back.config.update(ATTENTION)
        back.set_attn_implementation("power_softmax")
        stock = back(ids, attention_mask=mask).logits
        ours = converted(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours, stock, atol=2e-5, rtol=2e-5)
        assert (ours - reference).abs().max() > 1e-2  # and it is not the softmax model
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(converted.generate(ids, **kwargs), back.generate(ids, **kwargs))


def test_layout_fields_follow_the_source():
    neox = convert_checkpoint(build("gpt_neox_parallel")).config
    assert (neox.norm_type, neox.mlp_type, neox.parallel_residual) == ("layer", "plain", True)
    assert neox.rope_parameters["partial_rotary_factor"] == 0.5 and neox.attention_bias
    gpt = convert_checkpoint(build("gpt2")).config
    assert gpt.position_embedding_type == "learned" and gpt.hidden_act == "gelu_new" and gpt.tie_word_embeddings
    gemma = convert_checkpoint(build("gemma3")).config
    assert gemma.sandwich_norms and gemma.qk_norm and gemma.query_pre_attn_scalar == 12
    assert gemma.layer_rope_theta == [10_000.0, 1_000_000.0] and gemma.embedding_multiplier == 32**0.5


def test_converted_model_saves_and_loads(tmp_path):
    converted = convert_checkpoint(build("gpt2"))
    converted.save_pretrained(tmp_path)
    loaded = PolyAttnForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 10)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted(ids).logits)


def test_learned_positions_refuse_sequences_past_the_table():
    converted = convert_checkpoint(build("gpt2"))
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        converted(random_ids(1, 65))


def test_unknown_architecture_lists_the_supported_ones():
    opt = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported source architectures are " + ", ".join(supported_model_types())):
        convert_checkpoint(opt)


def test_gpt2_with_layer_scaled_attention_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, scale_attn_by_inverse_layer_idx=True, **TOKENS))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        convert_checkpoint(model)


@pytest.mark.parametrize("name", ["gpt_neox_parallel", "gpt2", "gemma3"])
def test_polynomial_form_of_a_converted_model(name):
    converted = convert_checkpoint(build(name), attn_eps=1e-2)
    ids = random_ids(2, 12, seed=7)
    with torch.no_grad():
        exact = converted(ids).logits
        converted.to_polynomial(calibration_data=[random_ids(4, 16, seed=s) for s in range(4)], progress=False)
        polynomial = converted(ids).logits
    assert converted.is_polynomial
    assert (polynomial - exact).abs().max() < 0.05 * exact.abs().max()
    report = converted.polynomial_report()
    assert report["blocks"][0]["depth"] > 0
    with pytest.raises(NotImplementedError, match="Llama layout"):
        SecureSession(converted)


@pytest.mark.parametrize("name", ["gpt_neox_parallel", "gpt2"])
def test_distillation_lowers_the_kl_of_a_converted_student(tmp_path, name):
    teacher = build(name)
    student = convert_checkpoint(teacher, **ATTENTION)
    held_out = random_ids(8, 16, seed=99)
    before = _held_out_kl(student.eval(), teacher, held_out)
    _distill(student.train(), teacher, tmp_path, steps=40)
    after = _held_out_kl(student.eval(), teacher, held_out)
    assert after < 0.7 * before, (before, after)
