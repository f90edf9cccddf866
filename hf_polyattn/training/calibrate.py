"""Range calibration from text: pick every polynomial domain from what the model really sees."""

from collections.abc import Iterable

import torch

from .data import text_blocks


def calibration_batches(
    tokenizer, texts: Iterable[str], block_size: int = 256, num_blocks: int = 64, batch_size: int = 8
) -> list[torch.Tensor]:
    """Unpadded blocks of token ids, batched: the input `to_polynomial(calibration_data=...)` takes.

    The blocks are spread evenly over the texts (the first `num_blocks` would see only the first
    text of a mixture, and the domains would miss the others).
    """
    if num_blocks < 1 or batch_size < 1:
        raise ValueError(f"num_blocks and batch_size must be >= 1, got {num_blocks} and {batch_size}")
    blocks = text_blocks(tokenizer, texts, block_size)["input_ids"]
    picked = torch.linspace(0, len(blocks) - 1, min(num_blocks, len(blocks))).round().long().unique()
    ids = torch.tensor([blocks[i] for i in picked.tolist()])
    return list(ids.split(batch_size))


def calibrate(
    model,
    tokenizer,
    texts: Iterable[str],
    block_size: int = 256,
    num_blocks: int = 64,
    batch_size: int = 8,
    **to_polynomial_options,
):
    """Run `num_blocks` blocks of `texts` through the exact model, then switch it to the polynomial
    form with domains from the observed ranges (with `margin`, see `to_polynomial`)."""
    batches = calibration_batches(tokenizer, texts, block_size, num_blocks, batch_size)
    return model.to_polynomial(calibration_data=batches, **to_polynomial_options)
