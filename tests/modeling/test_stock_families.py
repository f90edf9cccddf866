"""Stock softmax families run Power-Softmax through `attn_implementation="power_softmax"`."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

import hf_polyattn  # noqa: F401  (registers the attention)
from tests.helpers import assert_attention_matters, left_padded_batch, random_ids

SMALL = dict(vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)


def gpt_neox():
    return GPTNeoXForCausalLM(
        GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **SMALL)
    )


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL))


@pytest.mark.parametrize("build", [gpt_neox, gpt2], ids=["gpt_neox", "gpt2"])
def test_stock_family_runs_power_softmax_with_cache(build):
    torch.manual_seed(0)
    model = build().eval()
    model.set_attn_implementation("power_softmax")
    ids, mask = left_padded_batch([8, 5])
    out = model(ids, attention_mask=mask, output_attentions=True)
    weights = out.attentions[0]
    assert (weights[1, :, :, :3] == 0).all() and (weights.triu(1) == 0).all()
    # rows of real queries sum to S/(eps+S) ~ 1 (default eps 1e-6), not the softmax
    torch.testing.assert_close(weights[0].sum(-1), torch.ones_like(weights[0].sum(-1)), atol=1e-3, rtol=0)
    assert_attention_matters(model, random_ids(1, 8))

    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))

    with torch.no_grad():
        power = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        softmax = model(ids, attention_mask=mask).logits
    assert (power - softmax).abs().max() > 1e-2
