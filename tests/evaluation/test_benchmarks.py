"""Log-likelihood scoring against an unbatched reference, and task metrics on olmo-format data."""

import gzip
import json
import math

import pytest
import torch
import torch.nn.functional as F

from hf_polyattn.evaluation.benchmarks import evaluate_task
from hf_polyattn.evaluation.loglikelihood import encode_pair, score_continuations, text_bits_per_byte
from hf_polyattn.evaluation.tasks import UNCONDITIONAL_DOC_OFFSET, load_documents


def reference_score(model, tokenizer, context, continuation):
    """One pair, no padding, full logits: Σ log p(continuation) and whether it is the greedy path."""
    ids, length = encode_pair(tokenizer, context, continuation, 10_000)
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    target = torch.tensor(ids[-length:])
    predicted = log_probs[len(ids) - length - 1 : len(ids) - 1]
    return float(predicted.gather(-1, target[:, None]).sum()), bool((predicted.argmax(-1) == target).all())


def pairs_from(text: str, count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(count):
        start = int(torch.randint(0, len(text) - 400, (1,), generator=generator))
        cut = start + int(torch.randint(20, 300, (1,), generator=generator))
        end = cut + int(torch.randint(3, 60, (1,), generator=generator))
        pairs.append((text[start:cut], text[cut:end]))
    return pairs


def test_batched_scores_match_the_unbatched_reference(trained_tiny, python_docs):
    model, tokenizer = trained_tiny.model.to_exact(), trained_tiny.tokenizer
    pairs = pairs_from("\n".join(python_docs), 24) + [("The", " print"), ("x = ", "1")]
    scores = score_continuations(model, tokenizer, pairs, batch_size=5, progress=False)
    for (context, continuation), score in zip(pairs, scores):
        logprob, greedy = reference_score(model, tokenizer, context, continuation)
        assert score.logprob == pytest.approx(logprob, rel=1e-4, abs=1e-4)
        assert score.greedy == greedy


def shared_prompt_pairs(text: str) -> list[tuple[str, str]]:
    """Few-shot-like pairs: one prompt shared by every item, choices sharing their item's context,
    contexts of unequal lengths, and one-token continuations."""
    pairs = pairs_from(text, 12, seed=5)
    shots = "".join(context + continuation for context, continuation in pairs[:2])
    items = [(shots + pairs[2 + i][0][: 15 + 20 * i], [" " + p[1].strip() for p in pairs[6 + i : 9 + i]]) for i in range(3)]
    return [(context, answer) for context, answers in items for answer in answers] + [(shots + "x", " =")]


@pytest.mark.parametrize("form", ["exact", "polynomial", "softmax llama"])
def test_shared_prompts_score_like_each_pair_alone(form, trained_tiny, python_docs, tmp_path):
    text = "\n".join(python_docs)
    if form == "softmax llama":
        from tests.helpers import save_tiny_llama

        model, tokenizer = save_tiny_llama(tmp_path, text[:50_000])
    else:
        tokenizer = trained_tiny.tokenizer
        model = trained_tiny.model.to_exact()
        if form == "polynomial":
            ids = tokenizer(text[:60_000]).input_ids
            model = model.to_polynomial(calibration_data=[torch.tensor([ids[k : k + 128]]) for k in range(0, 8192, 128)], progress=False)
    pairs = shared_prompt_pairs(text)
    fed = []  # token positions the model ran, pads included
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: fed.append(args[0].numel()))
    scores = score_continuations(model, tokenizer, pairs, batch_size=2, progress=False)
    hook.remove()
    # the shared prompt ran once, not once per pair
    assert sum(fed) < 0.5 * sum(len(encode_pair(tokenizer, *pair, 10_000)[0]) for pair in pairs)
    for (context, continuation), score in zip(pairs, scores):
        logprob, greedy = reference_score(model, tokenizer, context, continuation)
        assert score.logprob == pytest.approx(logprob, rel=1e-4, abs=1e-4)
        assert score.greedy == greedy
    trained_tiny.model.to_exact()  # the session's model, shared with other tests, back in its exact form


def write_task(folder, name, variant, rows):
    path = folder / name / variant
    path.mkdir(parents=True)
    with gzip.open(path / "requests.jsonl.gz", "wt", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


def mc_rows(docs):
    rows = []
    for doc_id, (context, answers, gold) in enumerate(docs):
        for idx, answer in enumerate(answers):
            request = {"context": context, "continuation": answer}
            rows.append({"doc_id": doc_id, "idx": idx, "label": gold, "request": request})
            unconditional = {"context": "Answer:", "continuation": answer}  # must be ignored
            rows.append({"doc_id": doc_id + UNCONDITIONAL_DOC_OFFSET, "idx": idx, "label": gold, "request": unconditional})
    return rows


def test_multiple_choice_and_lambada_metrics(trained_tiny, python_docs, tmp_path):
    model, tokenizer = trained_tiny.model.to_exact(), trained_tiny.tokenizer
    pairs = pairs_from("\n".join(python_docs), 30, seed=3)
    docs = []
    for i in range(10):  # three candidate answers, gold rotating
        context = pairs[3 * i][0]
        answers = [" " + pairs[3 * i + k][1].strip() for k in range(3)]
        docs.append((context, answers, i % 3))
    write_task(tmp_path, "piqa", "rc_0shot", mc_rows(docs))
    lambada = [(p[0], " " + p[1].split()[0]) for p in pairs[:12] if p[1].split()]
    write_task(tmp_path, "lambada", "bpb_0shot", [
        {"doc_id": i, "idx": 0, "label": [c], "request": {"context": ctx, "continuation": c}} for i, (ctx, c) in enumerate(lambada)
    ])

    result = evaluate_task(model, tokenizer, "piqa", limit=None, tasks_dir=tmp_path, batch_size=4, progress=False)
    expected_acc = expected_norm = 0
    for context, answers, gold in docs:
        logprobs = [reference_score(model, tokenizer, context, a)[0] for a in answers]
        expected_acc += max(range(3), key=lambda k: logprobs[k]) == gold
        expected_norm += max(range(3), key=lambda k: logprobs[k] / len(answers[k])) == gold
    assert result == {"acc": expected_acc / 10, "acc_norm": expected_norm / 10, "n": 10}
    assert evaluate_task(model, tokenizer, "piqa", limit=4, tasks_dir=tmp_path, progress=False)["n"] == 4

    result = evaluate_task(model, tokenizer, "lambada", limit=None, tasks_dir=tmp_path, progress=False)
    references = [reference_score(model, tokenizer, c, x) for c, x in lambada]
    total_bytes = sum(len(x.encode()) for _, x in lambada)
    assert result["acc"] == sum(g for _, g in references) / len(lambada)
    assert result["bits_per_byte"] == pytest.approx(-sum(lp for lp, _ in references) / math.log(2) / total_bytes, rel=1e-4)


def test_text_bits_per_byte_matches_one_pass(trained_tiny, python_docs):
    model, tokenizer = trained_tiny.model.to_exact(), trained_tiny.tokenizer
    text = python_docs[5][:1500]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        log_probs = F.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    nll = -float(log_probs[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    expected = nll / math.log(2) / len(tokenizer.decode(ids[1:]).encode())
    assert text_bits_per_byte(model, tokenizer, text, block_size=len(ids), progress=False) == pytest.approx(expected, rel=1e-4)
    # In blocks, each block is scored from a fresh context: the same tokens, less context.
    blocks = [ids[i : i + 38] for i in range(0, len(ids) - 1, 37)]
    nll = 0.0
    with torch.no_grad():
        for block in blocks:
            log_probs = F.log_softmax(model(torch.tensor([block[:-1]])).logits[0].double(), -1)
            nll -= float(log_probs.gather(-1, torch.tensor(block[1:])[:, None]).sum())
    blockwise = nll / math.log(2) / len(tokenizer.decode(ids[1:]).encode())
    assert text_bits_per_byte(model, tokenizer, text, block_size=37, progress=False) == pytest.approx(blockwise, rel=1e-4)


def test_bad_task_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'mmlu_pro'; known tasks"):
        load_documents("mmlu_pro", tasks_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no requests for 'piqa'"):
        load_documents("piqa", tasks_dir=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        load_documents("piqa", limit=0, tasks_dir=tmp_path)
