"""Text → tokenizer → fixed-length training blocks, as `datasets.Dataset`s for `Trainer`."""

from collections.abc import Iterable

from datasets import Dataset
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_byte_level_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (no download: byte-level covers any input).

    Ids 0-3 are `<pad>`, `<s>`, `</s>`, `<unk>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (256 bytes + specials + merges), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def pack_into_blocks(token_ids: list[int], block_size: int) -> Dataset:
    """Cut one long token stream into `block_size` blocks (the tail is dropped) with LM labels."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    count = len(token_ids) // block_size
    if count == 0:
        raise ValueError(f"{len(token_ids)} tokens do not fill one block of {block_size}")
    blocks = [token_ids[i * block_size : (i + 1) * block_size] for i in range(count)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def text_blocks(tokenizer, texts: Iterable[str], block_size: int) -> Dataset:
    """Tokenise `texts` (each ended by EOS), concatenate, and pack into blocks."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    return pack_into_blocks(stream, block_size)
