"""Secure generation: `model.generate(ids, secure=True)` with every forward pass over CKKS.

`PolyAttnForCausalLM` carries the generation mixin (`modeling/secure_generation.py`, free of any
cryptography); importing `hf_polyattn` plugs in the CKKS session below as its default, so:

    import hf_polyattn
    out = model.generate(ids, secure=True, max_new_tokens=20)           # new keys, server in-process
    with SecureSession(model, server="process") as session:            # a separate server process
        out = model.generate(ids, session=session, max_new_tokens=20)
        print(session.report())                                        # where the encrypted time went
"""

from .ckks.session import SecureSession
from .modeling.secure_generation import SecureGenerationMixin


def default_session(model) -> SecureSession:
    """New CKKS keys (128-bit, N=8192) and an in-process server with a progress bar."""
    return SecureSession(model, progress=True)


def register() -> None:
    SecureGenerationMixin.secure_session_factory = staticmethod(default_session)


__all__ = ["SecureSession", "default_session", "register"]
