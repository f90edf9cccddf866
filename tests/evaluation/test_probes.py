"""The in-context-learning probes score what they claim: oracles get 1, constant guessers do not."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_polyattn.evaluation.probes import (
    IGNORE_INDEX,
    associative_recall_accuracy,
    associative_recall_blocks,
    attention_locality,
    induction_copy_accuracy,
)
from tests.helpers import random_ids, tiny_model

VOCAB = 68


class LookBackOracle(nn.Module):
    """Predicts the token that followed the latest earlier occurrence of the current token:
    the ideal associative-recall / induction-copying model (not our code, a reference)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, ids in enumerate(input_ids.tolist()):
            for t, token in enumerate(ids):
                earlier = [s for s in range(t) if ids[s] == token]
                logits[row, t, ids[earlier[-1] + 1] if earlier else 0] = 1.0
        return SimpleNamespace(logits=logits)


class PeriodicCopy(LookBackOracle):
    """Predicts the token `period` positions back in the sequence: perfect induction copying."""

    def __init__(self, vocab: int, period: int):
        super().__init__(vocab)
        self.period = period

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        source = input_ids[:, : input_ids.shape[1] - self.period]  # logits at t predict t + 1
        logits[:, self.period - 1 : -1].scatter_(-1, source[..., None], 1.0)
        return SimpleNamespace(logits=logits)


class ConstantGuess(LookBackOracle):
    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., 5] = 1.0
        return SimpleNamespace(logits=logits)


def test_recall_blocks_pair_each_queried_key_with_its_value():
    ids, labels = associative_recall_blocks(16, 6, VOCAB, seed=3)
    assert ids.shape == labels.shape == (16, 24)
    for row, row_labels in zip(ids.tolist(), labels.tolist()):
        context = dict(zip(row[0:12:2], row[1:12:2]))
        assert len(context) == 6  # distinct keys
        assert sorted(row[12::2]) == sorted(context)  # every key is queried once
        assert all(row[t + 1] == context[row[t]] for t in range(12, 24, 2))
        scored = [t for t, label in enumerate(row_labels) if label != IGNORE_INDEX]
        assert scored == list(range(13, 24, 2)) and all(row_labels[t] == row[t] for t in scored)
        assert max(row[0:12:2]) < 36 <= min(row[1:12:2])  # keys low half, values high half


def test_recall_accuracy_of_an_oracle_and_of_a_constant_guess():
    assert associative_recall_accuracy(LookBackOracle(VOCAB), 8, VOCAB, count=32) == 1.0
    assert associative_recall_accuracy(ConstantGuess(VOCAB), 8, VOCAB, count=32) < 0.2
    with pytest.raises(ValueError, match="num_pairs"):
        associative_recall_blocks(1, 40, VOCAB)


def test_induction_copying_separates_the_repeat_from_the_first_half():
    score = induction_copy_accuracy(PeriodicCopy(VOCAB, period=12), VOCAB, length=12, count=8)
    assert score.repeat == 1.0 and score.first < 0.3  # first half: only chance repeats are predictable
    assert induction_copy_accuracy(ConstantGuess(VOCAB), VOCAB, 12, count=8).repeat < 0.2


def test_locality_of_uniform_attention_is_known_in_closed_form():
    # No RoPE and keys that ignore their input (k = bias): every key scores the same, the weights
    # are uniform over the causal prefix, so distance = mean_i i/2 and entropy = mean_i log(i+1).
    model = tiny_model(position_embedding_type="learned", attention_bias=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.zero_()
            layer.self_attn.k_proj.bias.fill_(0.5)
    length = 10
    result = attention_locality(model, random_ids(2, length))
    assert [r.layer for r in result] == [0, 1]
    for layer in result:
        assert layer.mean_distance == pytest.approx((length - 1) / 4, rel=1e-4)
        assert layer.entropy == pytest.approx(sum(math.log(i + 1) for i in range(length)) / length, rel=1e-4)


def test_higher_power_concentrates_attention():
    ids = random_ids(2, 24)
    entropy = {p: attention_locality(tiny_model(attn_power=p), ids)[0].entropy for p in (2, 8)}
    assert entropy[8] < entropy[2]
