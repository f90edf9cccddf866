"""The fused Triton kernel computes the eager Power-Softmax attention: outputs and gradients.

There is no GPU in CI: the kernels run in Triton's CPU interpreter (`TRITON_INTERPRET=1`, set in
conftest.py before Triton is imported), which executes the same kernel code block by block.
"""

import os

import pytest
import torch

from hf_polyattn.kernels import FUSED_ATTENTION_NAME, fused_path_refusal
from hf_polyattn.modeling.power_softmax import power_softmax_attention_forward
from tests.helpers import left_padded_batch, random_ids, tiny_model


assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET=1"


def _kernel():
    from hf_polyattn.kernels.power_softmax_triton import fused_power_softmax_attention

    return fused_power_softmax_attention


def _eager_module(power, eps, form):
    model = tiny_model(attn_power=power, attn_eps=eps, attn_form=form)
    return model.model.layers[0].self_attn


CASES = {
    # batch, heads, kv heads, queries, keys, head dim, power, form
    "gqa_p4_sum": (2, 4, 2, 70, 70, 16, 4, "sum"),
    "decode_p8_mean_odd_dim": (1, 2, 1, 5, 83, 24, 8, "mean"),
    "p2_one_block_over": (1, 2, 2, 65, 65, 32, 2, "sum"),
    "p6_mean_gqa": (1, 4, 1, 40, 40, 16, 6, "mean"),
}


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_eager_forward_and_backward(case):
    batch, heads, kv_heads, q_len, kv_len, dim, power, form = CASES[case]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, q_len, dim, generator=generator, requires_grad=True)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=generator, requires_grad=True)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=generator, requires_grad=True)
    module = _eager_module(power, 1e-3, form)
    fused = _kernel()(q, k, v, dim**-0.5, power=power, eps=1e-3, form=form)
    eager = power_softmax_attention_forward(module, q, k, v, None, dim**-0.5)[0].transpose(1, 2)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-4)
    upstream = torch.randn(fused.shape, generator=generator)
    fused_grads = torch.autograd.grad((fused * upstream).sum(), (q, k, v))
    eager_grads = torch.autograd.grad((eager * upstream).sum(), (q, k, v))
    for name, ours, reference in zip("qkv", fused_grads, eager_grads):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4, msg=f"d{name}")


def test_kernel_refuses_bad_arguments():
    q, k = torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="even integer"):
        _kernel()(q, q, q, 0.25, power=3)
    with pytest.raises(ValueError, match="do not divide"):
        _kernel()(q, k, k, 0.25)
    with pytest.raises(ValueError, match="last positions"):
        _kernel()(q, q[:, :, :2], q[:, :, :2], 0.25)
    with pytest.raises(ValueError, match="powers of two"):
        _kernel()(q, q, q, 0.25, blocks=(48, 64, 4))


@pytest.mark.parametrize("blocks", [(16, 32, 2), (32, 16, 8)])
def test_block_sizes_compute_the_same_attention(blocks):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 45, 16, generator=generator, requires_grad=True) for _ in range(3))
    outputs = []
    for launch in ({}, {"blocks": blocks}):
        out = _kernel()(q, k, v, 0.25, power=4, eps=1e-3, **launch)
        outputs.append([out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v))])
    for ours, reference in zip(*outputs):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)  # another summation order


def test_model_with_the_fused_implementation_trains_and_generates_like_eager():
    eager, fused = tiny_model(attn_eps=1e-3), tiny_model(attn_eps=1e-3)
    fused.set_attn_implementation(FUSED_ATTENTION_NAME)
    ids = random_ids(2, 20)
    eager_out, fused_out = eager(ids, labels=ids), fused(ids, labels=ids)
    torch.testing.assert_close(fused_out.logits, eager_out.logits, atol=1e-5, rtol=1e-4)
    eager_out.loss.backward()
    fused_out.loss.backward()
    for (name, ours), reference in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, atol=1e-5, rtol=1e-3, msg=name)
    kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(fused.generate(ids, **kwargs), eager.generate(ids, **kwargs))
    # without padding the mask function builds no mask at all: the kernel reads none
    from transformers.masking_utils import create_causal_mask

    embeds = fused.model.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1])[None]
    assert create_causal_mask(config=fused.config, inputs_embeds=embeds, attention_mask=None, cache=None,
                              position_ids=position_ids) is None


def test_from_pretrained_with_the_fused_implementation(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(attn_eps=1e-3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=FUSED_ATTENTION_NAME).eval()
    assert loaded.config._attn_implementation == FUSED_ATTENTION_NAME
    ids = random_ids(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-4)


def test_cases_the_kernel_does_not_cover_fall_back_to_eager(monkeypatch):
    model = tiny_model(attn_eps=1e-2)
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 6, 8)
    k = torch.randn(1, 2, 6, 8)
    assert fused_path_refusal(attention, q, k, None, 0.0) is None
    ids, mask = left_padded_batch([8, 5])
    padded = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    padded[1, ..., :3] = False
    assert "padding" in fused_path_refusal(attention, q, k, padded, 0.0)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        model.set_attn_implementation(FUSED_ATTENTION_NAME)
        assert torch.equal(model(ids, attention_mask=mask).logits, reference)  # the eager path itself
    model.to_polynomial(calibration_data=[random_ids(2, 12, seed=s) for s in range(2)], progress=False)
    assert "polynomial" in fused_path_refusal(attention, q, k, None, 0.0)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "CUDA" in fused_path_refusal(attention, q, k, None, 0.0)


def test_model_trains_under_autocast_like_eager():
    # Under autocast Llama's RoPE returns fp32 queries and keys beside half-precision values, and the
    # output's gradient arrives in fp32: the kernels must run in one dtype (bf16 autocast failed to
    # compile on an H200). fp16 here: the interpreter computes on numpy arrays, which have no bf16.
    eager, fused = tiny_model(attn_eps=1e-3), tiny_model(attn_eps=1e-3)
    fused.set_attn_implementation(FUSED_ATTENTION_NAME)
    ids = random_ids(2, 20)
    losses = []
    for model in (eager, fused):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=2e-3, rtol=1e-3)
    for (name, ours), reference in zip(fused.named_parameters(), eager.parameters()):
        assert torch.isfinite(ours.grad).all(), name
        torch.testing.assert_close(ours.grad, reference.grad, atol=1e-2, rtol=1e-2, msg=name)
