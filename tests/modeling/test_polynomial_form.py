"""The polynomial form: only +, × and constants; faithful to the exact model once calibrated."""

import json
import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_polyattn.training.calibrate import calibration_batches
from hf_polyattn.training.pretrain import split_text
from hf_polyattn.evaluation.fidelity import polynomial_fidelity
from hf_polyattn.modeling.polynomial_form import PolynomialDomainWarning, approximated_ops
from tests.helpers import Encrypted, left_padded_batch, polynomial_tiny, random_ids, tiny_model


def calibrated_tiny(form: str = "sum", options: dict | None = None, **overrides):
    model = tiny_model(attn_form=form, **overrides)
    batches = [random_ids(4, 16, seed=s) for s in range(4)]
    return model.to_polynomial(calibration_data=batches, progress=False, **(options or {}))


def _encrypted_forward(model, ids, mask=None):
    embeddings = model.model.embed_tokens(ids).detach()
    with torch.no_grad():
        return model(inputs_embeds=embeddings.as_subclass(Encrypted), attention_mask=mask).logits


@pytest.mark.parametrize("form", ["sum", "mean"])
def test_polynomial_forward_uses_only_additions_and_multiplications(form):
    model = calibrated_tiny(form)
    for op in approximated_ops(model.model).values():
        op.check_domain = False  # the domain check compares values: the server cannot, and does not
    ids, mask = left_padded_batch([9, 6])
    logits = _encrypted_forward(model, ids, mask)
    assert isinstance(logits, Encrypted)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits.as_subclass(torch.Tensor), expected)
    # The detector is real: the exact model trips it.
    model.to_exact()
    with pytest.raises(AssertionError, match="non-polynomial step"):
        _encrypted_forward(model, ids, mask)


@pytest.mark.parametrize("form", ["sum", "mean"])
@pytest.mark.parametrize(
    "options, bound",
    [
        # the defaults promise 1e-3 relative per step (minimax: that error anywhere on the domain)
        ({}, 1e-2),
        # asked for more, the same circuits track this random model to 1e-3 of its logit scale
        (dict(tolerance=1e-6, activation={"degree": 31}), 1e-3),
    ],
)
def test_calibrated_polynomial_form_tracks_the_exact_model(form, options, bound):
    model = calibrated_tiny(form, options)
    ids, mask = left_padded_batch([16, 11, 14], seed=7)
    with torch.no_grad():
        polynomial = model(ids, attention_mask=mask).logits
        exact = model.to_exact()(ids, attention_mask=mask).logits
    kept = mask.bool()
    assert (polynomial[kept] - exact[kept]).abs().max() < bound * exact[kept].abs().max()
    assert torch.equal(polynomial[kept].argmax(-1), exact[kept].argmax(-1))


def test_to_exact_restores_the_exact_logits_and_back():
    model = tiny_model()
    ids = random_ids(2, 10)
    with torch.no_grad():
        exact = model(ids).logits
        model.to_polynomial(calibration_data=[ids], progress=False)
        assert model.is_polynomial
        polynomial = model(ids).logits
        assert not torch.equal(polynomial, exact)
        assert torch.equal(model.to_exact()(ids).logits, exact)
        assert not model.is_polynomial
        # back again without data: the calibrated description is kept
        assert torch.equal(model.to_polynomial()(ids).logits, polynomial)


def test_uncalibrated_defaults_always_run_and_say_so():
    model = tiny_model().to_polynomial(check_domain=False)
    assert model.config.polynomial["calibrated"] is False
    assert torch.isfinite(model(random_ids(2, 8)).logits).all()
    assert "DEFAULTS (not calibrated)" in model.polynomial_report(as_text=True)


def test_save_and_load_keep_the_polynomial_form(tmp_path):
    model = calibrated_tiny(attn_power=6)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["polynomial"]
    assert saved["enabled"] and saved["calibrated"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.is_polynomial
    ids, mask = left_padded_batch([12, 8])
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    exact_again = AutoModelForCausalLM.from_pretrained(tmp_path).to_exact()
    with torch.no_grad():
        assert torch.equal(exact_again(ids).logits, model.to_exact()(ids).logits)


def test_out_of_domain_inputs_warn_once_with_the_site_and_range():
    model = calibrated_tiny()
    ids = random_ids(2, 12)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50.0)  # far outside what calibration saw
    with pytest.warns(PolynomialDomainWarning, match=r"layers\.0\.input_layernorm\.inv_sqrt: \d+ of \d+ .*observed"):
        model(ids)
    op = approximated_ops(model.model)["layers.0.input_layernorm.inv_sqrt"]
    assert op.outside_count > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolynomialDomainWarning)
        model(ids)  # warned already: counted, not repeated
    assert op.outside_count > 0


def test_report_depths_match_the_approximations():
    model = calibrated_tiny()
    report = model.polynomial_report()
    for name, op in approximated_ops(model.model).items():
        site = report["sites"][name]
        assert site["depth"] == op.approximation.depth == op.approximation.measure()["depth"]
        assert site["domain"] == list(op.approximation.domain)
    assert report["total_depth"] == sum(b["depth"] for b in report["blocks"]) + report["head_depth"]
    assert report["calibrated"]
    text = model.polynomial_report(as_text=True)
    assert "total multiplicative depth" in text and "layers.1.mlp.act_fn" in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tolerance=0.0), "tolerance"),
        (dict(margin=0.5), "margin"),
        (dict(activation={"degree": 0}), "degree"),
        (dict(inv_sqrt={"iterations": -1}), "iterations"),
        (dict(calibration_data=[]), "no batches"),
    ],
)
def test_bad_polynomial_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model().to_polynomial(progress=False, **kwargs)


def test_report_before_to_polynomial_raises():
    with pytest.raises(ValueError, match="to_polynomial"):
        tiny_model().polynomial_report()


def test_trained_model_polynomial_fidelity(trained_tiny, python_docs):
    """Polynomial vs exact on held-out text of a trained model (the numbers of the results file)."""
    model, tokenizer = trained_tiny.model, trained_tiny.tokenizer
    train_text, _ = split_text(python_docs)
    batches = calibration_batches(tokenizer, [train_text], block_size=64, num_blocks=64, batch_size=16)
    held_out = torch.tensor(trained_tiny.eval_blocks[:64])
    model.to_exact().to_polynomial(calibration_data=batches, progress=False)
    scores = polynomial_fidelity(model, held_out, batch_size=16)
    model.to_exact()
    with torch.no_grad():  # the reference: one pass over all blocks in each form
        exact = model(held_out, labels=held_out)
        polynomial = model.to_polynomial()(held_out, labels=held_out)
        model.to_exact()
    assert scores["ppl_exact"] == pytest.approx(float(exact.loss.exp()), rel=1e-4)
    assert scores["ppl_poly"] == pytest.approx(float(polynomial.loss.exp()), rel=1e-4)
    assert scores["max_dlogit"] == pytest.approx(float((exact.logits - polynomial.logits).abs().max()), rel=1e-4)
    assert scores["top1_agreement"] >= 0.99
    assert abs(scores["ppl_poly"] / scores["ppl_exact"] - 1) < 0.01
    assert scores["max_dlogit"] < 0.05


def test_fidelity_reports_non_finite_logits_as_an_infinite_difference():
    model = polynomial_tiny()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # a broken model: one logit column goes NaN
    scores = polynomial_fidelity(model, random_ids(2, 12, seed=5), batch_size=2)
    assert scores["max_dlogit"] == float("inf") and math.isnan(scores["ppl_poly"])
