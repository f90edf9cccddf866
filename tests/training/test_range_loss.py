import pytest
import torch
from transformers import TrainingArguments

from hf_polyattn.training.range_loss import RangeLoss, RangeLossTrainer
from tests.helpers import random_ids, tiny_model

BATCHES = [random_ids(4, 16, seed=s) for s in range(4)]


def calibrated_exact_model():
    return tiny_model().to_polynomial(calibration_data=BATCHES, progress=False).to_exact()


def penalty(model, ids) -> float:
    with RangeLoss(model) as range_loss, torch.no_grad():
        model(ids)
        return float(range_loss.pop())


def test_zero_inside_the_domains_positive_outside():
    model = calibrated_exact_model()
    assert penalty(model, BATCHES[0]) == 0.0  # what calibration saw, with margin
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
    assert penalty(model, BATCHES[0]) > 0.0


def test_pop_resets_and_remove_detaches():
    model = calibrated_exact_model()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
    range_loss = RangeLoss(model, weight=2.0)
    model(BATCHES[0])
    first = range_loss.pop()
    assert first > 0 and range_loss.pop() == 0
    range_loss.remove()
    model(BATCHES[0])
    assert range_loss.pop() == 0


def test_range_loss_trainer_pulls_the_model_back_into_its_domains(tmp_path):
    dataset = [{"input_ids": row, "labels": row} for batch in BATCHES for row in batch]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=2e-2,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0,
    )
    after = {}
    for weight in (0.0, 100.0):  # the same training without, then with the range loss
        model = calibrated_exact_model().train()
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(8.0)
        before = penalty(model, BATCHES[0])
        RangeLossTrainer(model=model, args=args, train_dataset=dataset, range_loss_weight=weight).train()
        after[weight] = penalty(model.eval(), BATCHES[0])
    assert after[100.0] < 0.5 * before
    assert after[100.0] < 0.5 * after[0.0]


def test_range_loss_needs_calibrated_domains():
    with pytest.raises(ValueError, match="calibrated"):
        RangeLoss(tiny_model())
    with pytest.raises(ValueError, match="calibrated"):
        RangeLoss(tiny_model().to_polynomial(progress=False))
    with pytest.raises(ValueError, match="weight"):
        RangeLoss(calibrated_exact_model(), weight=-1.0)
