"""Shared test helpers: tiny configs, models whose attention matters, and the cache checks."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_polyattn import PolyAttnConfig, PolyAttnForCausalLM

VOCAB = 97


def tiny_config(**overrides) -> PolyAttnConfig:
    """A 2-layer GQA PolyAttn config; `initializer_range` large enough that scores are O(1)."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.15,
        attn_power=4,
        attn_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return PolyAttnConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> PolyAttnForCausalLM:
    torch.manual_seed(seed)
    return PolyAttnForCausalLM(tiny_config(**overrides)).eval()


def polynomial_tiny(**overrides) -> PolyAttnForCausalLM:
    """A tiny model in calibrated polynomial form that a 60/40-bit CKKS ring can run
    (`attn_eps` keeps the attention normaliser's 1/x inside what the ring holds)."""
    overrides.setdefault("attn_eps", 1e-2)
    model = tiny_model(**overrides)
    return model.to_polynomial(calibration_data=[random_ids(4, 16, seed=s) for s in range(4)], progress=False)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def left_padded_batch(lengths: list[int], pad_id: int = 0, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left padded to the longest, with their attention mask."""
    ids = random_ids(len(lengths), max(lengths), seed=seed)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : max(lengths) - length] = pad_id
        mask[row, max(lengths) - length :] = 1
    return ids, mask


def assert_attention_matters(model: PolyAttnForCausalLM, ids: torch.Tensor) -> None:
    """Changing the first token must move the last logits: otherwise a dropped cache goes unseen."""
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % model.config.vocab_size
    with torch.no_grad():
        delta = (model(ids).logits[:, -1] - model(changed).logits[:, -1]).abs().max()
    assert delta > 1e-2, f"attention barely matters (max |Δlogit| {delta:.2e}); the test would be blind"


def chunked_prefill_then_decode_logits(model, ids: torch.Tensor, mask: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits from a prefill of `chunk` tokens, the rest chunk by chunk, the last tokens one at a time."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pieces = []
    start = 0
    sizes = [chunk] * ((ids.shape[1] - 3) // chunk)
    sizes += [ids.shape[1] - 3 - sum(sizes)] + [1, 1, 1]
    for size in sizes:
        if size == 0:
            continue
        end = start + size
        position_ids = (mask[:, :end].cumsum(-1) - 1).clamp_min(0)[:, start:end]
        out = model(
            input_ids=ids[:, start:end],
            attention_mask=mask[:, :end],
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
        pieces.append(out.logits)
        start = end
    return torch.cat(pieces, dim=1)


class Encrypted(torch.Tensor):
    """A tensor standing for data the server cannot read: every result computed from it is
    `Encrypted` too, and any step a CKKS server could not evaluate on it raises.

    Allowed on encrypted data: +, -, ×, integer powers, sums/means, matmuls with anything,
    reshapes and casts. Refused: exp, log, division *by* encrypted data, sqrt/rsqrt, softmax,
    erf/tanh/sigmoid/SiLU/GELU, comparisons, max/min/abs, where.
    """

    REFUSED = {
        "exp", "exp_", "log", "sqrt", "rsqrt", "reciprocal", "softmax", "log_softmax", "erf", "tanh",
        "sigmoid", "silu", "gelu", "relu", "abs", "amax", "amin", "max", "min", "clamp", "clamp_min",
        "where", "eq", "ne", "gt", "ge", "lt", "le", "__eq__", "__gt__", "__ge__", "__lt__", "__le__",
        "sign", "floor", "ceil", "round", "sort", "topk", "argmax",
    }
    DIVISIONS = {"div", "__truediv__", "true_divide", "__rtruediv__", "div_", "__itruediv__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        flat = list(args) + list(kwargs.values())
        encrypted = any(isinstance(a, Encrypted) for a in flat)
        if encrypted and name in cls.REFUSED:
            raise AssertionError(f"non-polynomial step {name!r} on encrypted data")
        if encrypted and name in cls.DIVISIONS:
            divisor = args[0] if name == "__rtruediv__" else args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(divisor, Encrypted):
                raise AssertionError(f"division by encrypted data ({name})")
        if name == "pow" or name == "__pow__":
            exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
            if encrypted and isinstance(args[0], Encrypted) and not float(exponent).is_integer():
                raise AssertionError(f"non-integer power {exponent} of encrypted data")
        result = super().__torch_function__(func, types, args, kwargs)
        return result if encrypted else _plain(result)


def _plain(value):
    """Results of plaintext-only computations are not encrypted."""
    if isinstance(value, Encrypted):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


def save_tiny_llama(
    folder: Path, text: str, vocab_size: int = 300, seed: int = 0, **config
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny random softmax Llama with a byte-level tokenizer trained on `text`, saved to `folder`:
    the checkpoint folder a user would convert. `config` overrides the `LlamaConfig` fields."""
    from hf_polyattn.training.data import train_byte_level_tokenizer

    tokenizer = train_byte_level_tokenizer([text], vocab_size=vocab_size)
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.15, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(**{**fields, **config})).eval()
    llama.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return llama, tokenizer
