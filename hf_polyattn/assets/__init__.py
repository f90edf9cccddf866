"""Files shipped inside the package: the embedded default model.

`default_model/` is a 2-layer, d=64 PolyAttn model (p=4, ~0.1M parameters) trained on the
Shakespeare corpus by `examples/train_default_model.py` and saved calibrated, in polynomial form,
with its tokenizer. It is what secure generation runs when no model is named.
"""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


def load_default_model():
    """The embedded default model and its tokenizer (nothing is downloaded)."""
    from transformers import AutoTokenizer

    from ..modeling import PolyAttnForCausalLM

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
            "rebuild it with `python examples/train_default_model.py`"
        )
    return PolyAttnForCausalLM.from_pretrained(DEFAULT_MODEL_DIR), AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
