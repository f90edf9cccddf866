"""Sharing PolyAttn models on the Hub so others load them with `trust_remote_code=True`."""

from transformers import PreTrainedModel

from .modeling import PolyAttnForCausalLM, PolyAttnModel

HUB_TAGS = ["polyattn", "power-softmax", "polynomial-llm", "ckks", "homomorphic-encryption"]

# What `auto_map` points at: the flattened module names that `save_pretrained` copies next to the
# weights (modeling_polyattn.py and its same-folder imports).
AUTO_MAP = {
    "AutoConfig": "configuration_polyattn.PolyAttnConfig",
    "AutoModel": "modeling_polyattn.PolyAttnModel",
    "AutoModelForCausalLM": "modeling_polyattn.PolyAttnForCausalLM",
}


def enable_remote_code(model: PreTrainedModel) -> PreTrainedModel:
    """Make `save_pretrained` / `push_to_hub` ship the model code and a full `auto_map`.

    `register_for_auto_class` records only the saved object's own Auto class, so the base model's
    `AutoModel` entry is added to the config here as well.
    """
    if not isinstance(model, (PolyAttnForCausalLM, PolyAttnModel)):
        raise TypeError(f"expected a PolyAttn model, got {type(model).__name__}")
    model.config.register_for_auto_class("AutoConfig")
    type(model).register_for_auto_class(
        "AutoModelForCausalLM" if isinstance(model, PolyAttnForCausalLM) else "AutoModel"
    )
    model.config.auto_map = dict(AUTO_MAP)
    return model


def push_to_hub(model: PreTrainedModel, repo_id: str, tokenizer=None, tags: list[str] | None = None, **kwargs):
    """`model.push_to_hub` with the code shipped and the PolyAttn tags; given the tokenizer, it is
    pushed too, with the `secure-text-generation` pipeline in the config's `custom_pipelines`."""
    enable_remote_code(model)
    all_tags = HUB_TAGS + [tag for tag in tags or [] if tag not in HUB_TAGS]
    if tokenizer is None:
        return model.push_to_hub(repo_id, tags=all_tags, **kwargs)
    # With a tokenizer the secure-text-generation pipeline ships too: its code file and the
    # config's `custom_pipelines`, so `pipeline(task, model=repo_id, trust_remote_code=True)` works.
    from .pipelines import SecureTextGenerationPipeline

    return SecureTextGenerationPipeline(model=model, tokenizer=tokenizer).push_to_hub(repo_id, tags=all_tags, **kwargs)
