"""Secure generation: `model.generate(ids, secure=True)` with every forward pass over CKKS.

`PolyAttnForCausalLM` carries the generation mixin (`modeling/secure_generation.py`, free of any
cryptography); importing `hf_polyattn` plugs in the CKKS session below as its default, so:

    import hf_polyattn
    out = model.generate(ids, secure=True, max_new_tokens=20)           # new keys, server in-process
    with SecureSession(model, server="process") as session:            # a separate server process
        out = model.generate(ids, session=session, max_new_tokens=20)
        print(session.report())                                        # where the encrypted time went
"""

from typing import TYPE_CHECKING

from .modeling.secure_generation import SecureGenerationMixin

if TYPE_CHECKING:
    from .ckks.session import SecureSession


def secure_session_class() -> type:
    """`SecureSession`, imported on first use with an error naming what is missing."""
    # TenSEAL (and the service's websockets) load when encryption is first asked for, so that
    # training or evaluating after `import hf_polyattn` needs neither (a GPU box carried both only to import us)
    try:
        from .ckks.session import SecureSession
    except ImportError as error:
        raise ImportError(f"secure generation needs hf_polyattn's CKKS dependencies (tenseal, websockets): {error}") from error
    return SecureSession


def default_session(model) -> "SecureSession":
    """New CKKS keys (128-bit, N=8192) and an in-process server with a progress bar."""
    return secure_session_class()(model, progress=True)


def __getattr__(name: str):
    if name == "SecureSession":
        return secure_session_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    SecureGenerationMixin.secure_session_factory = staticmethod(default_session)


__all__ = ["SecureSession", "default_session", "register", "secure_session_class"]
