"""Files shipped inside the package: the embedded default model, the recovered polynomial SmolLM2.

`default_model/` is a 2-layer, d=64 PolyAttn model (p=4, ~0.1M parameters) trained on the
Shakespeare corpus by `examples/train_default_model.py` and saved calibrated, in polynomial form,
with its tokenizer. It is what secure generation runs when no model is named.

`smollm2_polyattn/` is SmolLM2-135M converted to p=4 and recovered on 2 CPU cores
(`benchmarks/conversion_smollm2_cpu.py`), calibrated, in polynomial form: a delta over the
`smollm2` offline checkpoint (`conversion.delta`), loaded by `load_checkpoint("smollm2-polyattn")`.
`reference.json` is its greedy continuation of a fixed prompt; `examples/ship_smollm2_polyattn.py`
writes the folder from a recovery run.
"""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
SMOLLM2_POLYATTN_DIR = Path(__file__).parent / "smollm2_polyattn"


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
