import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_polyattn import PolyAttnConfig, PolyAttnForCausalLM, PolyAttnModel
from tests.helpers import (
    assert_attention_matters,
    chunked_prefill_then_decode_logits,
    left_padded_batch,
    random_ids,
    tiny_config,
    tiny_model,
)


@pytest.mark.parametrize("form", ["sum", "mean"])
def test_cached_generation_equals_uncached_with_left_padding(form):
    model = tiny_model(attn_form=form)
    ids, mask = left_padded_batch([9, 5, 7])
    assert_attention_matters(model, random_ids(2, 9))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    # Each left-padded row generates what it generates alone, unpadded.
    for row, length in enumerate([9, 5, 7]):
        alone = model.generate(ids[row : row + 1, -length:], max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, length:], cached[row, ids.shape[1] :])


@pytest.mark.parametrize("chunk", [1, 4, 6])
def test_chunked_prefill_and_decode_match_full_prefill(chunk):
    model = tiny_model()
    ids, mask = left_padded_batch([14, 10])
    with torch.no_grad():
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        full = model(ids, attention_mask=mask, position_ids=position_ids).logits
        pieces = chunked_prefill_then_decode_logits(model, ids, mask, chunk)
    kept = mask.bool()
    torch.testing.assert_close(pieces[kept], full[kept], rtol=1e-4, atol=1e-4)


def test_outputs_hidden_states_and_attentions():
    model = tiny_model()
    ids, mask = left_padded_batch([6, 4])
    out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    config = model.config
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(out.attentions) == config.num_hidden_layers
    weights = out.attentions[0]
    assert weights.shape == (2, config.num_attention_heads, 6, 6)
    assert (weights[1, :, :, :2] == 0).all(), "padded keys must get exactly zero weight"
    assert (weights.triu(1) == 0).all(), "future keys must get exactly zero weight"
    assert (weights >= 0).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 10)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_tied_embeddings_share_storage_and_survive_a_round_trip(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_save_and_auto_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model(attn_power=6, attn_form="mean", attn_eps=1e-3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is PolyAttnForCausalLM
    assert (loaded.config.attn_power, loaded.config.attn_form, loaded.config.attn_eps) == (6, "mean", 1e-3)
    ids = random_ids(2, 11)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is PolyAttnModel
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)


def test_stock_llama_with_power_softmax_matches_polyattn():
    polyattn = tiny_model(attn_power=6, attn_eps=1e-3, attn_form="mean")
    fields = {k: v for k, v in polyattn.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    # The Power-Softmax fields ride along as extra config attributes of the stock model.
    attention = dict(attn_power=6, attn_eps=1e-3, attn_form="mean")
    llama = LlamaForCausalLM(LlamaConfig(**fields, **attention, attn_implementation="power_softmax")).eval()
    llama.load_state_dict(polyattn.state_dict())
    ids, mask = left_padded_batch([8, 5])
    with torch.no_grad():
        expected = polyattn(ids, attention_mask=mask).logits
        assert torch.equal(llama(ids, attention_mask=mask).logits, expected)
        # ... and it is not softmax attention any more.
        llama.set_attn_implementation("eager")
        assert (llama(ids, attention_mask=mask).logits - expected).abs().max() > 1e-2


def test_polyattn_refuses_softmax_attention_implementations():
    for name in ("sdpa", "eager", "flash_attention_2"):
        with pytest.raises(ValueError, match="Power-Softmax"):
            PolyAttnForCausalLM._from_config(tiny_config(), attn_implementation=name)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(attn_power=3), "attn_power"),
        (dict(attn_power=0), "attn_power"),
        (dict(attn_eps=-1e-3), "attn_eps"),
        (dict(attn_form="max"), "attn_form"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_wrong_field_type_is_refused_by_strict_validation():
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    with pytest.raises(StrictDataclassFieldValidationError, match="attn_power"):
        tiny_config(attn_power=4.0)


def test_config_round_trips_through_dict():
    config = tiny_config(attn_power=8, attn_form="mean", rope_theta=500.0)
    again = PolyAttnConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.rope_parameters["rope_theta"] == 500.0
