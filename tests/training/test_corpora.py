"""Training text from files, folders and the offline corpora (fetched from the package index)."""

import pytest

from hf_polyattn.training.corpora import bigbench_texts, read_texts


def test_read_texts_takes_files_folders_and_refuses_the_rest(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second")
    (tmp_path / "notes.md").write_text("not text data")
    assert read_texts([tmp_path]) == ["first", "second"]
    assert read_texts([tmp_path / "notes.md", tmp_path / "a.txt"]) == ["not text data", "first"]
    with pytest.raises(FileNotFoundError, match="corpus name"):
        read_texts([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt files"):
        read_texts([tmp_path / "empty"])


def test_default_corpus_is_shakespeare():
    texts = read_texts()
    assert len(texts) > 30 and any("ROMEO" in text for text in texts)


@pytest.mark.slow  # downloads the 358 MB BIG-bench sdist once
def test_bigbench_running_text_has_no_task_questions():
    texts = bigbench_texts()
    assert len(texts["wikipedia"]) > 1_000_000 and len(texts["movie_dialog"]) > 1_000_000
    assert "Armenian Church" in texts["wikipedia"]
    assert "In the preceding conversation" not in texts["movie_dialog"]
    with pytest.raises(ValueError, match="unknown BIG-bench parts"):
        bigbench_texts(("recipes",))


def test_teacher_continuations_extend_windows_of_the_text(python_docs):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_polyattn.training.data import teacher_continuations, train_byte_level_tokenizer

    text = python_docs[0] + python_docs[1]
    tokenizer = train_byte_level_tokenizer([text], vocab_size=320)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    )).eval()
    kwargs = dict(count=5, prompt_tokens=8, new_tokens=12, batch_size=2, progress=False)
    texts = teacher_continuations(teacher, tokenizer, text, **kwargs)
    assert len(texts) == 5 and texts == teacher_continuations(teacher, tokenizer, text, **kwargs)
    for sample in texts:
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        prompt = tokenizer.decode(ids[:8])
        assert prompt in text  # a window of the text, then the teacher's own tokens
        assert len(ids) >= 12
    with pytest.raises(ValueError, match="fewer than one prompt"):
        teacher_continuations(teacher, tokenizer, "short", count=1, prompt_tokens=8)
