"""`train_language_model`: the same seed gives the same run; the history holds what was logged."""

from datasets import Dataset

from hf_polyattn.training.pretrain import train_language_model
from tests.helpers import random_ids, tiny_model


def test_training_is_reproducible_and_lowers_the_held_out_loss(tmp_path):
    blocks = random_ids(64, 16, seed=4)
    # a learnable stream: every block is the same 4 random blocks repeated
    train = Dataset.from_dict({"input_ids": blocks[:4].repeat(16, 1).tolist(), "labels": blocks[:4].repeat(16, 1).tolist()})
    held_out = train.select(range(4))
    histories = [
        train_language_model(tiny_model(), train, held_out, tmp_path, steps=12, batch_size=8, learning_rate=1e-2,
                             eval_every=4, logging_steps=3, progress=False)
        for _ in range(2)
    ]
    curve = histories[0].eval_loss
    assert [step for step, _ in curve] == [0, 4, 8, 12]
    assert histories[0] == histories[1]
    assert curve[-1][1] < curve[0][1] - 0.5
    assert [step for step, _ in histories[0].grad_norm] == [3, 6, 9, 12]
    assert all(norm > 0 for _, norm in histories[0].grad_norm)


def test_a_bf16_run_hands_the_model_back_in_fp32(tmp_path):
    import torch

    blocks = random_ids(16, 16, seed=5)
    train = Dataset.from_dict({"input_ids": blocks.tolist(), "labels": blocks.tolist()})
    model = tiny_model()
    train_language_model(model, train, train.select(range(4)), tmp_path, steps=2, batch_size=8, bf16=True,
                         use_cpu=True, progress=False)
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    with torch.no_grad():
        logits = model(blocks[:2]).logits
    assert seen == [torch.float32]  # not silently under the autocast accelerate wrapped around it for training
    torch.testing.assert_close(logits, type(model).forward(model, blocks[:2]).logits, rtol=0, atol=0)
