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


def teacher_continuations(
    teacher,
    tokenizer,
    text: str,
    count: int,
    prompt_tokens: int = 32,
    new_tokens: int = 224,
    batch_size: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Texts sampled from the teacher, each prompted by a random window of `text`.

    Distillation data the teacher itself wrote: the student sees the teacher's own distribution
    beyond the training corpus (legitimate for distillation; never use the evaluation texts).
    """
    import torch
    from transformers.utils.logging import tqdm

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= prompt_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one prompt of {prompt_tokens}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - prompt_tokens, (count,), generator=generator).tolist()
    device = next(teacher.parameters()).device
    texts: list[str] = []
    torch.manual_seed(seed)
    for first in tqdm(range(0, count, batch_size), desc="teacher continuations", disable=not progress):
        prompts = torch.tensor([ids[s : s + prompt_tokens] for s in starts[first : first + batch_size]], device=device)
        with torch.no_grad():
            output = teacher.generate(
                prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, do_sample=True,
                temperature=temperature, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        texts += tokenizer.batch_decode(output, skip_special_tokens=True)
    return texts
