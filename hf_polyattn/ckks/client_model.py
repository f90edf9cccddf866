"""The client's copy of a model: what a client of `hf-polyattn serve` needs and nothing more.

A client embeds tokens, encrypts them, and (with `lm_head="client"`) applies the final norm's
weight and the LM head to the decrypted state; the decoder layers run on the server only. Its copy
is the same model class with no decoder layers: `generate()`, pipelines and `save_pretrained`
work as usual, `SecureSession(copy, server="ws://...")` drives the server, and the server checks
by fingerprint (`protocol.model_fingerprint`) that the copy matches what it serves.
"""

import copy

from ..modeling import PolyAttnForCausalLM

CLIENT_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def client_model(model: PolyAttnForCausalLM) -> PolyAttnForCausalLM:
    """A copy of `model` without its decoder layers (the embedding, the final norm, the LM head;
    for SmolLM2-135M 28M of 135M parameters), for the client side of a remote session."""
    if not isinstance(model, PolyAttnForCausalLM):
        raise TypeError(f"a client copy is made of a PolyAttnForCausalLM, got {type(model).__name__}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 0
    for per_layer in ("layer_types", "layer_rope_theta"):
        if getattr(config, per_layer, None) is not None:
            setattr(config, per_layer, [])
    if config.polynomial:  # the final norm's site stays (it describes the head's input)
        sites = {name: spec for name, spec in config.polynomial.get("sites", {}).items() if not name.startswith("layers.")}
        config.polynomial = {**config.polynomial, "sites": sites}
    copy_of = PolyAttnForCausalLM(config).to(model.dtype).eval()
    state = model.state_dict()
    copy_of.load_state_dict({name: state[name] for name in CLIENT_TENSORS}, strict=False)
    return copy_of
