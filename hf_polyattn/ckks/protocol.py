"""The secure-inference wire protocol, shared by `hf-polyattn serve` and its clients.

One message is one binary WebSocket frame: a 4-byte big-endian header length, a JSON object
(the header), then raw bytes (a ciphertext, the public context, or nothing). No pickle: neither
side ever deserialises anything but JSON and SEAL/TenSEAL ciphertexts, so a compromised peer
cannot run code in the other process (the client holds the secret key).

Every header carries `kind`, `session` (given by the server in `welcome`) and `request` (the
client's counter; the server's replies and refresh requests repeat it), so a reply to another
request or another session is refused instead of being read as this one's.

A session:

    client                                   server
    hello {lm_head, max_tokens, mask_bound}
          + public context          ->
                                    <-       welcome {session, max_tokens, model}   | error
    step + ciphertext               ->
                                    <-       refresh + masked ciphertext   (0 or more times)
    refreshed + ciphertext | refused ->
                                    <-       result + ciphertext           | error
    reset / profile / status        ->
                                    <-       ok / profile {profile} / status {sessions}
    close                           ->
"""

import hashlib
import json
import struct
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1
HEADER_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024

CLIENT_KINDS = frozenset({"hello", "step", "refreshed", "refused", "reset", "profile", "status", "close"})
SERVER_KINDS = frozenset({"welcome", "result", "refresh", "ok", "profile", "status", "error"})
# Kinds whose payload is a ciphertext (or the public context): the others carry none.
PAYLOAD_KINDS = frozenset({"hello", "step", "refreshed", "result", "refresh"})


class ProtocolError(ValueError):
    """A message that does not follow the protocol (malformed, truncated, unknown kind, ...)."""


class RemoteError(RuntimeError):
    """The other side answered with an `error` message; `error_type` names its exception."""

    def __init__(self, error_type: str, message: str):
        super().__init__(f"server: {error_type}: {message}")
        self.error_type = error_type
        self.remote_message = message


@dataclass
class Message:
    kind: str
    payload: bytes = b""
    header: dict = field(default_factory=dict)

    def get(self, name: str, kind: type, default=None):
        """A header field of type `kind` (or `default` when absent); a wrong type is a `ProtocolError`."""
        value = self.header.get(name, default)
        if value is not default and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            raise ProtocolError(f"{self.kind!r}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
        return value


def pack(kind: str, payload: bytes = b"", **header) -> bytes:
    """A frame: header length, the JSON header (`kind` plus `header`), the payload."""
    encoded = json.dumps({"kind": kind, **header}, separators=(",", ":")).encode()
    return HEADER_LENGTH.pack(len(encoded)) + encoded + bytes(payload)


def unpack(frame, allowed: frozenset) -> Message:
    """Parse and validate a frame; anything else is a `ProtocolError` naming what is wrong."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("messages are binary frames, got a text frame")
    frame = bytes(frame)
    if len(frame) < HEADER_LENGTH.size:
        raise ProtocolError(f"a truncated message ({len(frame)} bytes)")
    (length,) = HEADER_LENGTH.unpack_from(frame)
    if length > MAX_HEADER_BYTES or HEADER_LENGTH.size + length > len(frame):
        raise ProtocolError(f"a header of {length} bytes in a {len(frame)}-byte message (truncated or malformed)")
    try:
        header = json.loads(frame[HEADER_LENGTH.size : HEADER_LENGTH.size + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"the header is not JSON: {error}") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise ProtocolError("the header must be a JSON object with a string 'kind'")
    kind = header.pop("kind")
    if kind not in allowed:
        raise ProtocolError(f"unknown message kind {kind!r}")
    payload = frame[HEADER_LENGTH.size + length :]
    if kind in PAYLOAD_KINDS and not payload:
        raise ProtocolError(f"a {kind!r} message without its payload")
    if kind not in PAYLOAD_KINDS and payload:
        raise ProtocolError(f"a {kind!r} message carries no payload, got {len(payload)} bytes")
    return Message(kind, payload, header)


def error_frame(error: BaseException, **header) -> bytes:
    """An `error` message naming the exception's type (so the client can re-raise a ValueError)."""
    return pack("error", error_type=type(error).__name__, message=str(error), **header)


def model_fingerprint(model) -> str:
    """sha256 over what a client computes with (the embedding table, the final norm's weight, the LM
    head: names, shapes, float32 values): the client compares the server's with its own, so it never
    embeds tokens for (or applies the head of) another model. A client's copy without the decoder
    layers (`client_model`) has the same fingerprint as the whole model."""
    digest = hashlib.sha256()
    tensors = {"embedding": model.get_input_embeddings().weight, "final_norm": model.model.norm.weight,
               "lm_head": model.lm_head.weight}
    for name, tensor in tensors.items():
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
