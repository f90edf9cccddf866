"""A CKKS server in its own process: it receives the model's weights, the public context and
ciphertexts, nothing else, and asks the client for refreshes over the same pipe.

Messages are `(kind, payload)` tuples: the client sends `step` (a ciphertext), `reset`,
`profile` and `close`; the server answers `result` (a ciphertext), `ok`, `profile` (its
`LatencyProfiler`) or `error`, and during a step may send `refresh` (a masked ciphertext), which
the client answers with `refreshed` (a fresh ciphertext of the same values).
"""

import multiprocessing
import tempfile
from pathlib import Path

from .client import key_id

START_TIMEOUT_S = 300
# The longest silence from a working server: it speaks at least at every refresh (a few seconds
# apart even for a 30-layer model); a dead or stuck one is given up on after this.
REPLY_TIMEOUT_S = 600


class _PipeClient:
    """What the server process knows of the client: its key id and a way to ask for refreshes."""

    def __init__(self, connection, public_context: bytes):
        self.connection = connection
        self.key_id = key_id(public_context)

    def refresh(self, masked: bytes) -> bytes:
        self.connection.send(("refresh", masked))
        kind, payload = self.connection.recv()
        if kind != "refreshed":
            raise RuntimeError(f"expected a refreshed ciphertext from the client, got {kind!r}")
        return payload


def _serve(connection, model_dir: str, public_context: bytes, lm_head: bool, max_tokens: int) -> None:
    """The server process's loop."""
    try:
        from ..modeling import PolyAttnForCausalLM
        from .refresh import ClientRoundTrip
        from .server import CKKSServer

        model = PolyAttnForCausalLM.from_pretrained(model_dir).eval()
        refresher = ClientRoundTrip(_PipeClient(connection, public_context))
        server = CKKSServer(model, public_context, refresher, lm_head=lm_head, max_tokens=max_tokens)
    except Exception as error:  # noqa: BLE001  (reported to the client, which raises it)
        connection.send(("error", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ok", None))
    while True:
        kind, payload = connection.recv()
        if kind == "close":
            return
        try:
            if kind == "step":
                reply = ("result", server.step(payload))
            elif kind == "reset":
                server.reset()
                reply = ("ok", None)
            elif kind == "profile":
                reply = ("profile", server.profiler)
            else:
                reply = ("error", f"ValueError: unknown request {kind!r}")
        except Exception as error:  # noqa: BLE001
            reply = ("error", f"{type(error).__name__}: {error}")
        connection.send(reply)


class ServerProcess:
    """The client's handle on a `CKKSServer` running in a separate process.

    The process gets a saved copy of the model (the server owns the weights), the client's
    `public_context()` and ciphertexts. With `keep_transcript`, `transcript` keeps every byte
    string sent to it, so what the server saw can be audited (it grows by megabytes per step:
    off by default). Every wait has a timeout (`START_TIMEOUT_S`, `REPLY_TIMEOUT_S`); a step
    interrupted midway (Ctrl-C, a timeout) leaves the pipe mid-conversation, so the handle then
    refuses further calls instead of reading a stale reply.
    """

    def __init__(self, model, client, lm_head: bool = True, max_tokens: int = 64, keep_transcript: bool = False,
                 reply_timeout: float = REPLY_TIMEOUT_S):
        self.client = client
        self.max_tokens = max_tokens
        self.reply_timeout = reply_timeout
        self._broken: str | None = None
        self._model_dir = tempfile.TemporaryDirectory(prefix="polyattn-server-")
        model.save_pretrained(self._model_dir.name)
        public = client.public_context()
        self.transcript: list[bytes] | None = [public] if keep_transcript else None
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the client is inherited
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, self._model_dir.name, public, lm_head, max_tokens), daemon=True
        )
        self._process.start()
        child.close()
        if not self._connection.poll(START_TIMEOUT_S):
            self.close()
            raise RuntimeError(f"the server process did not start within {START_TIMEOUT_S} s")
        self._expect("ok")

    def _record(self, message: bytes) -> None:
        if self.transcript is not None:
            self.transcript.append(message)

    def _request(self, kind: str, payload, wanted: str):
        """Send one request and wait for its answer, serving refreshes meanwhile."""
        if self._broken:
            raise RuntimeError(f"the server connection is unusable ({self._broken}): close this session and open a new one")
        try:
            self._connection.send((kind, payload))
            return self._expect(wanted)
        except BaseException as error:  # an interrupt or a timeout mid-conversation
            if not isinstance(error, ValueError):  # a refused request leaves the conversation in order
                self._broken = f"{kind} interrupted by {type(error).__name__}"
            raise

    def _expect(self, wanted: str):
        while True:
            if not self._connection.poll(self.reply_timeout):
                self.close()
                raise TimeoutError(f"the server process said nothing for {self.reply_timeout:.0f} s; it was stopped")
            try:
                kind, payload = self._connection.recv()
            except EOFError as error:
                raise RuntimeError("the server process exited") from error
            if kind == "refresh":  # a refresh request in the middle of a step
                fresh = self.client.refresh(payload)
                self._record(fresh)
                self._connection.send(("refreshed", fresh))
            elif kind == "error":
                error_type, _, message = payload.partition(": ")
                raise (ValueError if error_type == "ValueError" else RuntimeError)(f"server: {message or payload}")
            elif kind == wanted:
                return payload
            else:
                raise RuntimeError(f"unexpected message {kind!r} from the server process")

    def step(self, ciphertext: bytes) -> bytes:
        """One token through the server's model: encrypted embedding in, ciphertext out."""
        self._record(ciphertext)
        return self._request("step", ciphertext, "result")

    def reset(self) -> None:
        self._request("reset", None, "ok")

    def profiler(self):
        """The server's `LatencyProfiler` (its op times, refreshes and refresh bytes)."""
        return self._request("profile", None, "profile")

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._connection.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
        self._model_dir.cleanup()

    def __del__(self):
        if getattr(self, "_process", None) is not None:
            self.close()

    @property
    def model_dir(self) -> Path:
        return Path(self._model_dir.name)
