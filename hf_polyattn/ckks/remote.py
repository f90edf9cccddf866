"""The client's side of a CKKS server elsewhere: `RemoteServer`, a session on `hf-polyattn serve`
over WebSockets, and `ServerProcess`, which starts such a server on 127.0.0.1 in a child process
for single-machine use. Both speak `protocol.py` (JSON headers and ciphertext bytes, no pickle):
the server gets the public context and ciphertexts, nothing else, and asks for refreshes on the
same connection. Every wait has a timeout; WebSocket pings notice a peer that stopped answering.
"""

import os
import secrets
import select
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import connect

from .client import RefreshRefused
from .profiler import LatencyProfiler
from .protocol import PROTOCOL_VERSION, SERVER_KINDS, Message, ProtocolError, RemoteError, model_fingerprint, pack, unpack
from .service import TOKEN_ENV, ServiceLimits

START_TIMEOUT_S = 300
# The longest silence from a working server: it speaks at least at every refresh (a few seconds
# apart even for a 30-layer model); a stuck one is given up on after this (a dead one sooner:
# its socket closes, or it stops answering pings).
REPLY_TIMEOUT_S = 600
# Errors the server raises before changing anything: the session goes on after them.
_REFUSALS = ("ValueError", "ProtocolError")


class RemoteServer:
    """One session on a `SecureService` (`hf-polyattn serve`), with the interface `SecureSession`
    drives: `step`, `reset`, `profiler`, `max_tokens`, `close`.

    Args:
        url: `ws://host:port` or `wss://host:port` (TLS: the server's certificate is verified
            against the system's authorities, or `cafile`).
        client: the `CKKSClient` (keys); only its public context and ciphertexts are sent.
        model: the model the client embeds with: the server's must be the same (checked by
            fingerprint), and its largest vector bounds what a refresh request may hold.
        lm_head: the server applies the LM head (`True`) or returns the final normalised state.
        max_tokens: the longest sequence this session will send (the server may allow less).
        token: the server's shared secret, if it asks for one (`hf-polyattn serve` reads it from
            `HF_POLYATTN_TOKEN`).
        open_timeout, reply_timeout, keepalive: seconds to connect and have the session built,
            to wait for any message mid-request, between pings (a silent peer is dropped after
            twice `keepalive`).
        keep_transcript: keep every byte string sent to the server in `transcript` (audits; it
            grows by megabytes per step).
    """

    def __init__(self, url: str, client, model, *, lm_head: bool = True, max_tokens: int = 256, token: str | None = None,
                 cafile: str | None = None, open_timeout: float = 120.0, reply_timeout: float = REPLY_TIMEOUT_S,
                 keepalive: float = ServiceLimits.keepalive, keep_transcript: bool = False):
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"a server URL starts with ws:// or wss://, got {url!r}")
        self.url, self.client, self.lm_head, self.token = url, client, lm_head, token
        self.requested_tokens = max_tokens
        self.timeouts = (open_timeout, reply_timeout, keepalive)
        self._ssl = ssl.create_default_context(cafile=cafile) if url.startswith("wss://") else None
        self.fingerprint = model_fingerprint(model)
        # a packed ciphertext of the KV cache is refreshed in every slot
        self.max_refresh_size = self.client.params.slots
        self.transcript: list[bytes] | None = [] if keep_transcript else None
        self._connection = None
        self._open()

    @property
    def reply_timeout(self) -> float:
        return self.timeouts[1]

    def _open(self) -> None:
        """Connect, say hello (the public context), check the welcome."""
        open_timeout, reply_timeout, keepalive = self.timeouts
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            self._connection = connect(
                self.url, ssl=self._ssl, compression=None, max_size=None, open_timeout=open_timeout,
                ping_interval=keepalive, ping_timeout=keepalive, close_timeout=keepalive, additional_headers=headers,
                proxy=None, legacy=True,
            )
        except InvalidStatus as error:
            status = error.response.status_code
            raise ConnectionError(f"the server at {self.url} refused the connection (HTTP {status}"
                                  + (": a valid token is required)" if status == 401 else ")")) from None
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as error:
            raise ConnectionError(f"could not connect to a CKKS server at {self.url}: {error}") from error
        self._broken: str | None = None
        self._request_id = 0
        self.session = None
        public = self.client.public_context()
        self._record(public)
        self._send(pack("hello", public, version=PROTOCOL_VERSION, lm_head=self.lm_head,
                        max_tokens=self.requested_tokens, mask_bound=float(self.client.params.mask_bound)))
        welcome = self._receive(open_timeout)  # the server builds the session: part of opening it
        if welcome.kind == "error":
            self.close()
            raise _remote_error(welcome)
        if welcome.kind != "welcome":
            self.close()
            raise ProtocolError(f"expected the server's welcome, got {welcome.kind!r}")
        if welcome.header.get("model") != self.fingerprint:
            self.close()
            raise ValueError(f"the server at {self.url} runs another model than this client's (weights fingerprint "
                             f"{str(welcome.header.get('model'))[:12]} vs {self.fingerprint[:12]})")
        self.session = welcome.get("session", str)
        self.max_tokens = welcome.get("max_tokens", int)

    def _record(self, message: bytes) -> None:
        if self.transcript is not None:
            self.transcript.append(message)

    def _send(self, frame: bytes) -> None:
        try:
            self._connection.send(frame)
        except ConnectionClosed as error:
            raise ConnectionError(f"the server closed the session ({_why(error)})") from None

    def _receive(self, timeout: float) -> Message:
        try:
            frame = self._connection.recv(timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"the server at {self.url} said nothing for {timeout:.0f} s") from None
        except ConnectionClosed as error:
            raise ConnectionError(f"the server closed the session ({_why(error)})") from None
        return unpack(frame, SERVER_KINDS)

    def _request(self, kind: str, payload: bytes = b"", wanted: str = "ok") -> Message:
        """Send one request and wait for its answer, answering refresh requests meanwhile."""
        if self._broken:
            raise RuntimeError(f"the session is unusable ({self._broken}): reset() opens a new one")
        self._request_id += 1
        request = self._request_id
        try:
            self._send(pack(kind, payload, session=self.session, request=request))
            while True:
                message = self._receive(self.reply_timeout)
                if message.header.get("request") != request:
                    raise ProtocolError(f"a {message.kind!r} message for request {message.header.get('request')}, "
                                        f"not {request}")
                if message.kind == "refresh":
                    self._refresh(message, request)
                elif message.kind == "error":
                    raise _remote_error(message)
                elif message.kind == wanted:
                    return message
                else:
                    raise ProtocolError(f"unexpected {message.kind!r} from the server")
        except BaseException as error:  # an interrupt, a timeout or a lost server mid-conversation
            if not (isinstance(error, RemoteError) and error.error_type in _REFUSALS):  # a refusal leaves it in order
                self._broken = f"{kind} interrupted by {type(error).__name__}"
                self.close()
            raise

    def _refresh(self, message: Message, request: int) -> None:
        try:
            fresh = self.client.refresh(message.payload, max_size=self.max_refresh_size)
        except RefreshRefused:
            self._send(pack("refused", session=self.session, request=request))  # the same answer for every failure
            raise
        self._record(fresh)
        self._send(pack("refreshed", fresh, session=self.session, request=request))

    def step(self, ciphertext: bytes) -> bytes:
        """One token through the server's model: encrypted embedding in, ciphertext out."""
        self._record(ciphertext)
        return self._request("step", ciphertext, "result").payload

    def reset(self) -> None:
        """Start a new sequence; after an interrupted request, open a new session instead."""
        if self._broken:
            self.close()
            self._open()
        else:
            self._request("reset")

    def profiler(self) -> LatencyProfiler:
        """The server's `LatencyProfiler` of this session (op times, refreshes, refresh bytes)."""
        return LatencyProfiler.from_dict(self._request("profile", wanted="profile").header.get("profile") or {})

    def status(self) -> dict:
        """The server's session count and this session's position."""
        return self._request("status", wanted="status").header

    def close(self) -> None:
        if self._connection is not None:
            try:
                if not self._broken and self.session:
                    self._connection.send(pack("close", session=self.session, request=self._request_id + 1))
            except ConnectionClosed:
                pass
            self._connection.close()


def _why(error: ConnectionClosed) -> str:
    received = error.rcvd
    if received is None:
        return "the connection dropped without a close frame: the server stopped or stopped answering"
    return f"code {received.code}: {received.reason or 'no reason given'}"


def _remote_error(message: Message) -> RemoteError:
    error_type = message.get("error_type", str, "RuntimeError")
    text = message.get("message", str, "")
    if error_type in _REFUSALS:
        return _RemoteValueError(error_type, text)
    return RemoteError(error_type, text)


class _RemoteValueError(RemoteError, ValueError):
    """A request the server refused as invalid (the session stays usable)."""


class ServiceProcess:
    """`hf-polyattn serve` in a child process: a fresh interpreter running
    `python -m hf_polyattn.ckks.service` (never the caller's script, so no
    `if __name__ == "__main__"` guard is needed), listening on 127.0.0.1 at a free port.

    `options` are `serve`'s own (`--max-sessions 2` ...); `token` is passed in the child's
    environment, never on its command line (which other users can read). Its output goes to a
    private log, whose tail any start-up failure quotes. `stop()` ends it (SIGTERM, then SIGKILL).
    """

    def __init__(self, model: str | Path, *options: str, token: str | None = None, timeout: float = START_TIMEOUT_S):
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in stop())
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))}
        environment.pop(TOKEN_ENV, None)
        if token:
            environment[TOKEN_ENV] = token
        command = [sys.executable, "-m", "hf_polyattn.ckks.service", "--model", str(model), "--port", "0", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, env=environment)
        try:
            self.url = self._wait_for_url(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_for_url(self, timeout: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline().decode().strip() if ready else ""
        if line.startswith("serving "):
            return line.split(" ", 1)[1]
        self.process.kill()
        self.process.wait()
        said = "\n".join(self.log().splitlines()[-5:]) or "nothing"
        if not ready:
            raise RuntimeError(f"the server process did not start within {timeout:.0f} s; it said:\n{said}")
        raise RuntimeError(f"the server process failed to start:\n{said}")

    def log(self) -> str:
        """What the server wrote to its standard error so far."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self._log.close()


class ServerProcess:
    """A `CKKSServer` for this client alone, in a child process (`ServiceProcess`) on 127.0.0.1.

    It loads a saved copy of the model (in a private 0700 folder) and accepts only this handle,
    by a random token; the handle drives it as a `RemoteServer` (`session`), so it speaks the
    same protocol as `hf-polyattn serve` on another machine.
    """

    def __init__(self, model, client, lm_head: bool = True, max_tokens: int = 64, keep_transcript: bool = False,
                 reply_timeout: float = REPLY_TIMEOUT_S, start_timeout: float = START_TIMEOUT_S):
        self._folder = tempfile.TemporaryDirectory(prefix="polyattn-server-")
        model.save_pretrained(self.model_dir)
        token = secrets.token_urlsafe(32)
        self.session: RemoteServer | None = None
        self.service: ServiceProcess | None = None
        try:
            # two sessions: reset() after an interrupted request opens the next before the old one is gone
            self.service = ServiceProcess(self.model_dir, "--max-sessions", "2", "--max-tokens", str(max_tokens),
                                          token=token, timeout=start_timeout)
            self.session = RemoteServer(self.service.url, client, model, lm_head=lm_head, max_tokens=max_tokens,
                                        token=token, reply_timeout=reply_timeout, keep_transcript=keep_transcript)
        except BaseException:
            self.close()
            raise

    @property
    def model_dir(self) -> Path:
        return Path(self._folder.name)

    @property
    def transcript(self) -> list[bytes] | None:
        return self.session.transcript

    @property
    def max_tokens(self) -> int:
        return self.session.max_tokens

    def step(self, ciphertext: bytes) -> bytes:
        return self.session.step(ciphertext)

    def reset(self) -> None:
        self.session.reset()

    def profiler(self) -> LatencyProfiler:
        return self.session.profiler()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        if self.service is not None:
            self.service.stop()
            self.service = None
        self._folder.cleanup()

    def __del__(self):
        if getattr(self, "service", None) is not None:
            self.close()
