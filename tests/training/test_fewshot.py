"""In-context episodes built from running text: each example's answer is what its task says."""

import re

import pytest

from hf_polyattn.training.fewshot import LABELS, TASKS, fewshot_episodes, sentences


def _examples(episode: str) -> list[tuple[str, str]]:
    """The (input, output) pairs of an episode, whatever its label pair."""
    for question, answer in LABELS:
        pairs = re.findall(rf"^{re.escape(question)} (.*)\n{re.escape(answer)} (.*)$", episode, flags=re.M)
        if pairs:
            return pairs
    raise AssertionError(f"no examples in {episode[:200]!r}")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_answer_follows_from_its_input(python_docs, task):
    pool = [sentence for text in python_docs for sentence in sentences(text)]
    episodes = fewshot_episodes(python_docs, count=4, max_chars=1500, tasks=[task], seed=1)
    assert len(episodes) == 4 and len(set(episodes)) == 4
    for episode in episodes:
        pairs = _examples(episode)
        assert len(pairs) >= 3, "an episode shows its task several times"
        assert 1500 <= len(episode) <= 1500 + 700  # stops after the example that crosses max_chars
        for source, answer in pairs:
            if task == "last_word":
                assert any(s.startswith(f"{source} {answer}") for s in pool)
            elif task == "blank":
                assert source.count("___") == 1 and answer and " " not in answer
                filled = re.compile(re.escape(source).replace("___", re.escape(answer) + "[.!?,;:]*"))
                assert any(filled.fullmatch(s) for s in pool)
            elif task == "next_sentence":
                assert (source, answer) in zip(pool, pool[1:])
            elif task == "uppercase":
                assert answer == source.upper()
            elif task == "reverse":
                assert answer.split(" ") == source.split(" ")[::-1]
            elif task == "first_word":
                assert source in pool and answer and answer in source.split(" ")[0]
            else:  # recall: every query's value is the one listed for its key
                listed = dict(re.findall(r"^([a-z][a-z'-]*): (\d+)$", episode, flags=re.M))
                assert listed[source] == answer


def test_episodes_are_deterministic_and_refuse_bad_requests(python_docs):
    first = fewshot_episodes(python_docs, count=7, seed=3)
    assert first == fewshot_episodes(python_docs, count=7, seed=3) != fewshot_episodes(python_docs, count=7, seed=4)
    with pytest.raises(ValueError, match="unknown few-shot tasks"):
        fewshot_episodes(python_docs, count=1, tasks=["translate"])
    with pytest.raises(ValueError, match="at least 50"):
        fewshot_episodes(["Too short to hold many sentences. Really it is."], count=1)
    with pytest.raises(ValueError, match="count >= 1"):
        fewshot_episodes(python_docs, count=0)


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
def test_episodes_for_share_make_that_share_of_the_blocks(python_docs, share):
    from hf_polyattn.training.data import text_blocks, train_byte_level_tokenizer
    from hf_polyattn.training.fewshot import episodes_for_share, fewshot_blocks

    text = "\n".join(python_docs)
    tokenizer = train_byte_level_tokenizer([text], vocab_size=400)
    running = len(text_blocks(tokenizer, [text], 64))
    episodes = len(fewshot_blocks(tokenizer, [text], 64, episodes_for_share(share, len(text))))
    assert episodes / (episodes + running) == pytest.approx(share, abs=0.03)
    with pytest.raises(ValueError, match="share must be in"):
        episodes_for_share(1.0, len(text))
