"""`generate(secure=True)`: the standard generation loop with every forward pass run elsewhere.

The mixin knows nothing of cryptography (this folder imports only torch and transformers): a
*session* object does the encrypted work. `hf_polyattn.generation.SecureSession` is the CKKS one
and registers itself as the default factory on import, so `model.generate(ids, secure=True)`
works once `hf_polyattn` is imported; any object with the same two methods can stand in.

A session is incremental: `session.reset(expected_steps)` starts a sequence, `session.logits(ids)` takes the
tokens after those already sent and returns their next-token logits `(n, vocab)`. Logits
processors, stopping criteria, streamers and sampling of `GenerationConfig` all run as usual on
the decrypted logits.
"""

import threading
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast


class GenerationSession(Protocol):
    def reset(self, expected_steps: int | None = None) -> None: ...

    def logits(self, input_ids: torch.LongTensor) -> torch.Tensor: ...


class SecureGenerationMixin:
    """Adds `secure=` / `session=` to `generate()` (see the module docstring)."""

    # Set by `hf_polyattn.generation` on import: model -> session (the CKKS client/server pair).
    secure_session_factory: ClassVar[Callable[[Any], GenerationSession] | None] = None
    # The session of the generate() running in this thread, per model: one model may generate
    # securely in several threads at once (a web service), each with its own session.
    _running_sessions: ClassVar[threading.local] = threading.local()

    @property
    def _secure_session(self) -> GenerationSession | None:
        return getattr(self._running_sessions, "by_model", {}).get(id(self))

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, *, secure: bool = False, session=None, **kwargs):
        """`GenerationMixin.generate`, plus:

        Args:
            secure: run every forward pass over CKKS with a fresh default session (new keys).
            session: an explicit session (e.g. `hf_polyattn.generation.SecureSession(model, ...)`
                or one talking to a server process); implies `secure=True`.

        Secure generation takes one unpadded sequence, greedy or sampled decoding (no beams, no
        assistant model), and always runs incrementally over the server's encrypted KV cache.
        """
        if not secure and session is None:
            return super().generate(inputs, generation_config, **kwargs)
        ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        _check_secure_request(self, ids, generation_config, kwargs)
        if session is None:
            if self.secure_session_factory is None:
                raise RuntimeError("secure generation needs the CKKS backend: `import hf_polyattn` (with tenseal installed)")
            session = self.secure_session_factory(self)
        config = generation_config or self.generation_config
        new_tokens = kwargs.get("max_new_tokens") or config.max_new_tokens
        # the last generated token is never fed back: prompt + new - 1 encrypted steps
        steps = ids.shape[1] + new_tokens - 1 if new_tokens else None
        limit = getattr(session, "max_tokens", None)
        if steps is not None and limit is not None and steps > limit:  # said now, not after limit encrypted steps
            raise ValueError(
                f"a {ids.shape[1]}-token prompt + max_new_tokens={new_tokens} needs {steps} encrypted steps, over the "
                f"session's max_tokens={limit}: shorten them or build the session with a larger max_tokens"
            )
        session.reset(expected_steps=steps)
        kwargs["use_cache"] = True  # the session is incremental: after the prompt, one new token per call
        running = self._running_sessions.__dict__.setdefault("by_model", {})
        running[id(self)] = session
        try:
            return super().generate(ids, generation_config, **kwargs)
        finally:
            del running[id(self)]

    def _secure_forward(self, input_ids: torch.LongTensor | None, inputs_embeds, cache) -> CausalLMOutputWithPast:
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("secure generation takes input_ids (the client embeds them), not inputs_embeds")
        logits = self._secure_session.logits(input_ids[0])
        return CausalLMOutputWithPast(logits=logits[None].to(self.dtype), cache=cache)


def _check_secure_request(model, ids: torch.Tensor | None, generation_config, kwargs: dict) -> None:
    """Refuse what the encrypted loop cannot do, before any key is made."""
    if ids is None or ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError("secure generation takes one sequence: input_ids of shape (1, length)")
    if ids.shape[1] == 0:
        raise ValueError("secure generation needs a prompt of at least one token")
    vocab = model.get_input_embeddings().num_embeddings
    if bool((ids < 0).any()) or bool((ids >= vocab).any()):
        raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab}): {sorted(set(ids[(ids < 0) | (ids >= vocab)].tolist()))[:5]}")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("secure generation takes an unpadded sequence (its attention_mask must be all ones)")
    for name in ("inputs_embeds", "assistant_model", "prompt_lookup_num_tokens"):
        if kwargs.get(name) is not None:
            raise ValueError(f"secure generation does not support {name}")
    config = generation_config or model.generation_config
    if (kwargs.get("num_beams") or config.num_beams or 1) != 1:
        raise ValueError("secure generation runs one hypothesis: num_beams must be 1")
    if (kwargs.get("num_return_sequences") or config.num_return_sequences or 1) != 1:
        # the session holds one encrypted KV cache: a second row would be a copy of the first
        raise ValueError("secure generation returns one sequence: num_return_sequences must be 1")
    if kwargs.get("use_cache") is False:
        raise ValueError("secure generation always uses the server's encrypted KV cache: drop use_cache=False")
