"""`hf-polyattn serve`: the CKKS server as a network service, many sessions at once.

The service loads its own model (calibrated polynomial form) once and speaks `protocol.py` over
WebSockets (the `websockets` library: a bidirectional channel, since the server asks the client
for refreshes in the middle of a step). Each connection is one session with its own public keys,
encrypted KV cache and limits (`ServiceLimits`); a session ends when its client closes, goes
silent past the idle timeout, or breaks the protocol, and its memory goes with it. Off loopback the
service refuses to listen without TLS; a shared secret (`token`) can restrict who opens sessions.

It never holds a secret key: `CKKSServer` refuses a context that carries one.
"""

import ctypes
import ctypes.util
import gc
import hmac
import ipaddress
import math
import secrets
import signal
import ssl
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus

from websockets.exceptions import ConnectionClosed
from websockets.sync.server import serve

from .client import RefreshRefused, key_id
from .protocol import CLIENT_KINDS, PROTOCOL_VERSION, Message, ProtocolError, error_frame, model_fingerprint, pack, unpack
from .refresh import ClientRoundTrip
from .server import CKKSServer, require_encryptable

TOKEN_ENV = "HF_POLYATTN_TOKEN"


@dataclass(frozen=True)
class ServiceLimits:
    """What one service accepts.

    `max_sessions`: sessions at once (more are refused with close code 1013, "try again later");
    `max_tokens`: the longest sequence of any session (its KV cache grows with it);
    `idle_timeout`: seconds a session may stay silent between requests before it is closed;
    `reply_timeout`: seconds the server waits for a client's refresh answer mid-step;
    `max_message_bytes`: the largest message (the public context is the largest: 34 MB at N=8192).
    `keepalive`: seconds between WebSocket pings (a peer that stops answering is dropped after twice that).
    """

    max_sessions: int = 8
    max_tokens: int = 256
    idle_timeout: float = 600.0
    reply_timeout: float = 120.0
    max_message_bytes: int = 128 * 2**20
    keepalive: float = 20.0

    def __post_init__(self):
        for name in ("max_sessions", "max_tokens", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("idle_timeout", "reply_timeout", "keepalive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ClientPeer:
    """What a session's server knows of its client: the key id and a way to ask for refreshes."""

    def __init__(self, connection, session: str, public_context: bytes, reply_timeout: float):
        self.connection = connection
        self.session = session
        self.key_id = key_id(public_context)
        self.reply_timeout = reply_timeout
        self.request: int | None = None  # the step being served: refresh requests repeat its id

    def refresh(self, masked: bytes) -> bytes:
        self.connection.send(pack("refresh", masked, session=self.session, request=self.request))
        answer = unpack(self.connection.recv(timeout=self.reply_timeout), CLIENT_KINDS)
        if answer.kind == "refused":
            raise RefreshRefused("the client refused a refresh request")
        if answer.kind != "refreshed" or answer.header.get("request") != self.request:
            raise ProtocolError(f"expected the refresh of request {self.request}, got {answer.kind!r}")
        return answer.payload


class SecureService:
    """A WebSocket server that runs `CKKSServer` sessions for remote clients.

    Args:
        model: a `PolyAttnForCausalLM` in calibrated polynomial form (checked at once).
        host, port: where to listen (`port=0`: any free port; `url` says which).
        limits: `ServiceLimits`.
        ssl_context: a server-side `ssl.SSLContext` (certificate and key); required off loopback.
        token: if set, a client must send `Authorization: Bearer <token>` to open a session.
    """

    def __init__(self, model, host: str = "127.0.0.1", port: int = 0, *, limits: ServiceLimits | None = None,
                 ssl_context: ssl.SSLContext | None = None, token: str | None = None):
        require_encryptable(model)
        if ssl_context is None and not is_loopback(host):
            raise ValueError(
                f"refusing to serve on {host} without TLS: ciphertexts would cross the network unauthenticated; "
                "pass a certificate and key (--certfile/--keyfile), or listen on 127.0.0.1 behind a TLS proxy"
            )
        self.model = model.eval()
        self.limits = limits or ServiceLimits()
        self.fingerprint = model_fingerprint(model)
        self._token = token
        self._sessions: set[str] = set()  # ids of the open sessions
        self._lock = threading.Lock()
        self._server = serve(
            self._handle, host, port, ssl=ssl_context, compression=None,  # ciphertexts do not compress
            max_size=self.limits.max_message_bytes, process_request=self._authorize if token else None,
            ping_interval=self.limits.keepalive, ping_timeout=self.limits.keepalive,
        )
        self._thread: threading.Thread | None = None
        bound_host, bound_port = self._server.socket.getsockname()[:2]
        self.url = f"{'wss' if ssl_context else 'ws'}://{bound_host}:{bound_port}"

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _authorize(self, connection, request):
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self._token}".encode()):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "a valid token is required\n")
        return None

    def serve_forever(self) -> None:
        """Serve until `shutdown()` (from another thread) or, in `main`, SIGINT/SIGTERM."""
        self._server.serve_forever()

    def start(self) -> "SecureService":
        """Serve from a background thread (tests, notebooks); `shutdown()` stops it."""
        self._thread = threading.Thread(target=self.serve_forever, name="polyattn-serve", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop accepting, close every session (code 1001, going away), wait for their handlers."""
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "SecureService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # one connection = one session, in its own thread (websockets' sync server)
    def _handle(self, connection) -> None:
        session = secrets.token_hex(8)
        with self._lock:
            full = len(self._sessions) >= self.limits.max_sessions
            if not full:
                self._sessions.add(session)
        if full:
            connection.close(1013, f"the server is at its limit of {self.limits.max_sessions} sessions; try again later")
            return
        try:
            self._serve_session(connection, session)
        except ConnectionClosed:
            pass  # the client left (or was killed): its session goes with it
        except TimeoutError:  # silent between requests, or no answer to a refresh request
            connection.close(1000, "the client went silent past its timeout; session closed")
        except (RefreshRefused, ProtocolError, ValueError) as error:  # mid-step: the session cannot go on
            self._send_quietly(connection, error_frame(error, session=session))
            connection.close(1008, "session ended: " + str(error)[:100])
        except Exception as error:  # noqa: BLE001  (a fault of this session only: the others go on)
            self._send_quietly(connection, error_frame(error, session=session))
            connection.close(1011, f"session ended by a server error: {type(error).__name__}")
        finally:
            with self._lock:
                self._sessions.discard(session)
            _release_memory()

    @staticmethod
    def _send_quietly(connection, frame: bytes) -> None:
        try:
            connection.send(frame)
        except ConnectionClosed:
            pass

    def _open(self, connection, session: str) -> tuple[CKKSServer, _ClientPeer] | None:
        """Read `hello`, build the session's `CKKSServer`; on bad input answer `error` and close."""
        try:
            hello = unpack(connection.recv(timeout=self.limits.idle_timeout), CLIENT_KINDS)
            if hello.kind != "hello":
                raise ProtocolError(f"a session starts with 'hello', got {hello.kind!r}")
            version = hello.get("version", int)
            if version != PROTOCOL_VERSION:
                raise ProtocolError(f"protocol version {version}; this server speaks {PROTOCOL_VERSION}")
            lm_head = hello.get("lm_head", bool, True)
            max_tokens = hello.get("max_tokens", int, self.limits.max_tokens)
            if not 1 <= max_tokens <= self.limits.max_tokens:
                raise ValueError(f"max_tokens={max_tokens}: this server takes 1 to {self.limits.max_tokens}")
            mask_bound = hello.get("mask_bound", float)
            if mask_bound is None or not (math.isfinite(mask_bound) and 1.0 <= mask_bound <= 2.0**40):
                raise ProtocolError(f"mask_bound must be a number in [1, 2^40], got {mask_bound!r}")
            peer = _ClientPeer(connection, session, hello.payload, self.limits.reply_timeout)
            server = CKKSServer(self.model, hello.payload, ClientRoundTrip(peer, mask_bound=mask_bound),
                                lm_head=lm_head, max_tokens=max_tokens)
        except (ProtocolError, ValueError, RuntimeError) as error:
            self._send_quietly(connection, error_frame(error))
            connection.close(1008, "no session: " + str(error)[:100])
            return None
        connection.send(pack("welcome", session=session, max_tokens=max_tokens, lm_head=lm_head,
                             model=self.fingerprint, version=PROTOCOL_VERSION))
        return server, peer

    def _serve_session(self, connection, session: str) -> None:
        opened = self._open(connection, session)
        if opened is None:
            return
        server, peer = opened
        while True:
            frame = connection.recv(timeout=self.limits.idle_timeout)
            try:
                message = unpack(frame, CLIENT_KINDS)
                if message.header.get("session") != session:
                    raise ProtocolError("the message names another session")
                request = message.get("request", int)
                if request is None:
                    raise ProtocolError(f"a {message.kind!r} message without its request id")
            except ProtocolError as error:  # nothing ran: the session is as it was
                connection.send(error_frame(error, session=session))
                continue
            if message.kind == "close":
                connection.close(1000, "closed by the client")
                return
            connection.send(self._answer(server, peer, message, session, request))

    def _answer(self, server: CKKSServer, peer: _ClientPeer, message: Message, session: str, request: int) -> bytes:
        ids = {"session": session, "request": request}
        if message.kind == "step":
            peer.request = request
            try:
                result = server.step(message.payload)
            except ValueError as error:  # a refused input: the step left the KV cache as it was (DecoderCircuit.step)
                return error_frame(error, **ids)
            return pack("result", result, **ids)
        if message.kind == "reset":
            server.reset()
            return pack("ok", **ids)
        if message.kind == "profile":
            return pack("profile", profile=server.profiler.to_dict(), **ids)
        if message.kind == "status":
            return pack("status", sessions=self.session_count, position=server.position, **ids)
        return error_frame(ProtocolError(f"a {message.kind!r} message outside a refresh"), **ids)


def _release_memory() -> None:
    """Hand a finished session's memory back to the OS: its keys and ciphertexts are tens of MB
    of small C++ allocations that glibc would otherwise keep, so a long-running server's size
    would follow its busiest moment instead of its current sessions."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()
M_ARENA_MAX = -8  # glibc's mallopt parameter


def main(argv: list[str] | None = None) -> int:
    """`hf-polyattn serve` (also `python -m hf_polyattn.ckks.service`): serve until SIGINT/SIGTERM."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="hf-polyattn serve", description=main.__doc__)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    return run_service(args, os.environ.get(TOKEN_ENV))


def add_serve_arguments(parser) -> None:
    defaults = ServiceLimits()
    parser.add_argument("--model", help="a calibrated polynomial-form model: a folder or an offline name (default: the embedded model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (off loopback: TLS required)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free port, printed at start)")
    parser.add_argument("--max-sessions", type=int, default=defaults.max_sessions)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="the longest sequence of a session")
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout, help="seconds a session may stay silent")
    parser.add_argument("--reply-timeout", type=float, default=defaults.reply_timeout, help="seconds to wait for a refresh answer")
    parser.add_argument("--max-message-mb", type=float, default=defaults.max_message_bytes / 2**20)
    parser.add_argument("--keepalive", type=float, default=defaults.keepalive, help="seconds between pings")
    parser.add_argument("--certfile", help="TLS certificate (PEM); with --keyfile, serve wss://")
    parser.add_argument("--keyfile", help="TLS private key (PEM)")


def run_service(args, token: str | None) -> int:
    """Load the model, listen, print the URL on stdout (one line: `serving <url>`), serve."""
    from ..assets import DEFAULT_MODEL_DIR
    from ..conversion.checkpoints import load_checkpoint

    if bool(args.certfile) != bool(args.keyfile):
        print("hf-polyattn serve: --certfile and --keyfile go together", file=sys.stderr)
        return 2
    ssl_context = None
    if args.certfile:
        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(args.certfile, args.keyfile)
    try:
        limits = ServiceLimits(
            max_sessions=args.max_sessions, max_tokens=args.max_tokens, idle_timeout=args.idle_timeout,
            reply_timeout=args.reply_timeout, max_message_bytes=int(args.max_message_mb * 2**20), keepalive=args.keepalive,
        )
        model, _ = load_checkpoint(args.model or DEFAULT_MODEL_DIR, tokenizer=False)
        service = SecureService(model, args.host, args.port, limits=limits, ssl_context=ssl_context, token=token)
    except (ValueError, NotImplementedError, OSError) as error:
        print(f"hf-polyattn serve: {error}", file=sys.stderr)
        return 2
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_ARENA_MAX, 2)  # sessions are threads: glibc's per-thread arenas would each keep a session's worth
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    service.start()
    print(f"serving {service.url}", flush=True)
    print(f"model {args.model or 'the embedded default'} ({service.fingerprint[:12]}), limits {limits}"
          + (", token required" if token else ""), file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        pass
    print("shutting down: closing sessions", file=sys.stderr, flush=True)
    service.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
