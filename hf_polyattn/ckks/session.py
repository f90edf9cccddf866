"""`SecureSession`: a client (the secret key) and a server driving one sequence, token by token."""

import time
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .client import CKKSClient
from .params import CKKSParameters
from .profiler import LatencyProfiler
from .refresh import ClientRoundTrip
from .remote import RemoteServer, ServerProcess
from .server import CKKSServer, require_encryptable


class SecureSession:
    """Encrypted next-token logits for a growing sequence: what `generate(secure=True)` runs.

    For every new token the client embeds it, encrypts the embedding and sends the ciphertext;
    the server runs one incremental step over its encrypted KV cache (so token `t+1` never
    recomputes tokens `<= t`) and answers with a ciphertext; the client decrypts it.

    Args:
        model: a calibrated polynomial-form `PolyAttnForCausalLM`. The client uses its embedding
            table (and, with `lm_head="client"`, its final norm weight and LM head); with a server
            URL, its copy without decoder layers is enough (`ckks.client_model`).
        params: CKKS parameters of new keys (default `CKKSParameters()`: N=8192, 128-bit).
        client: reuse an existing `CKKSClient` (its keys) instead of making new ones.
        server: `"in-process"` (a `CKKSServer` in this process, sharing the profiler),
            `"process"` (a `ServerProcess`: `hf-polyattn serve` in a child process, on
            127.0.0.1), or the URL of a running `hf-polyattn serve` (`ws://host:port`,
            `wss://` with TLS). The last two receive only the public context and ciphertexts,
            and ask this client for refreshes on the same connection.
        lm_head: `"server"` returns encrypted logits (the LM head stays with the server);
            `"client"` returns the encrypted final hidden state, the client applies the head.
        max_tokens: the longest sequence (prompt + generated) the server accepts.
        mask_seed: seed of the refresh masks (tests); `None` draws them from the OS.
        progress: show a per-token progress bar.
        keep_transcript: with a server elsewhere, keep every byte string sent to it in
            `session.server.transcript` (audits; it grows by megabytes per step).
        token: the shared secret a `hf-polyattn serve` URL asks for (`HF_POLYATTN_TOKEN`).
        cafile: with a `wss://` URL, the certificate authority to trust (a self-signed server).
        encoding_budget: with `server="in-process"`, the bytes of encoded weight diagonals the
            server keeps (`CKKSServer`; default half the available memory).
        kv_copies: with `server="in-process"`, positions packed per KV ciphertext (`CKKSServer`;
            default as many as the slots hold).
    """

    def __init__(
        self,
        model,
        params: CKKSParameters | None = None,
        *,
        client: CKKSClient | None = None,
        server: str = "in-process",
        lm_head: Literal["server", "client"] = "server",
        max_tokens: int = 256,
        mask_seed: int | None = None,
        progress: bool = False,
        keep_transcript: bool = False,
        token: str | None = None,
        cafile: str | None = None,
        encoding_budget: int | None = None,
        kv_copies: int | None = None,
    ):
        if lm_head not in ("server", "client"):
            raise ValueError(f"lm_head must be 'server' or 'client', got {lm_head!r}")
        remote = isinstance(server, str) and server.startswith(("ws://", "wss://"))
        if server not in ("in-process", "process") and not remote:
            raise ValueError(f"server must be 'in-process', 'process' or a ws:// or wss:// URL, got {server!r}")
        if not remote:  # a server elsewhere checks its own model; here this one is the server's
            require_encryptable(model)
        self.model = model
        self.client = client or CKKSClient(params)
        self.lm_head = lm_head
        self.profiler = LatencyProfiler()
        self.progress = progress
        on_server = lm_head == "server"
        if remote:
            self.server = RemoteServer(server, self.client, model, lm_head=on_server, max_tokens=max_tokens,
                                       token=token, cafile=cafile, keep_transcript=keep_transcript)
        elif server == "process":
            self.server = ServerProcess(model, self.client, lm_head=on_server, max_tokens=max_tokens,
                                        keep_transcript=keep_transcript)
        else:
            refresher = ClientRoundTrip(self.client, seed=mask_seed)
            self.server = CKKSServer(
                model, self.client.public_context(), refresher, self.profiler, lm_head=on_server, max_tokens=max_tokens,
                encoding_budget=encoding_budget, kv_copies=kv_copies,
            )
        self.step_seconds: list[float] = []
        self.prefill_tokens = 0  # the first call after a reset: the prompt
        self._bar, self._expected_steps = None, None

    @property
    def max_tokens(self) -> int:
        """The longest sequence (prompt + generated) the server accepts."""
        return self.server.max_tokens

    @property
    def position(self) -> int:
        """Tokens of the current sequence the server has seen."""
        return len(self.step_seconds)

    def reset(self, expected_steps: int | None = None) -> None:
        """Start a new sequence (the server drops its encrypted KV cache); `expected_steps` sizes
        the progress bar (prompt + generated tokens)."""
        self.server.reset()
        self.step_seconds = []
        self.prefill_tokens = 0
        self._close_bar()
        self._expected_steps = expected_steps

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar = None

    @torch.no_grad()
    def logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Next-token logits `(n, vocab)` (float64) of the `n` tokens after those already sent."""
        input_ids = torch.as_tensor(input_ids).reshape(-1)
        if self.position + len(input_ids) > self.server.max_tokens:
            raise ValueError(
                f"{self.position} + {len(input_ids)} tokens is longer than the server's max_tokens={self.server.max_tokens}"
            )
        if self.position == 0:
            self.prefill_tokens = len(input_ids)
        embeddings = self.model.get_input_embeddings()(input_ids).double().numpy()
        rows = []
        if self._bar is None:  # one bar per sequence, across calls
            self._bar = tqdm(total=self._expected_steps, desc="encrypted tokens", unit="token", disable=not self.progress)
        for embedding in embeddings:
            start = time.perf_counter()
            with self.profiler.op("encrypt"):
                ciphertext = self.client.encrypt(embedding)
            self.profiler.bytes["to_server"] += len(ciphertext)
            answer = self.server.step(ciphertext)
            self.profiler.bytes["to_client"] += len(answer)
            with self.profiler.op("decrypt"):
                rows.append(self.client.decrypt(answer))
            self.step_seconds.append(time.perf_counter() - start)
            self._bar.update()
        if self._bar.total is not None and self.position >= self._bar.total:
            self._close_bar()
        out = torch.from_numpy(np.stack(rows))
        if self.lm_head == "client":  # the server sent the normalised state before the norm weight
            final_norm, head = self.model.model.norm.weight, self.model.lm_head.weight
            out = (out * final_norm.double()) @ head.double().T
        return out

    def latency(self) -> LatencyProfiler:
        """Every timed operation of both sides (a server elsewhere sends its own as JSON)."""
        if isinstance(self.server, CKKSServer):
            return self.profiler
        return LatencyProfiler().merge(self.profiler).merge(self.server.profiler())

    def report(self) -> str:
        """Prefill and per-token times, then the per-operation breakdown, as Markdown."""
        steps, prompt = self.step_seconds, self.prefill_tokens
        lines = [f"encrypted steps: {len(steps)}, {sum(steps):.1f} s"]
        if prompt:
            lines.append(f"prefill ({prompt} prompt tokens): {sum(steps[:prompt]):.1f} s")
        generated = steps[prompt:]
        if generated:
            lines.append(f"after the prompt: {len(generated)} steps, {sum(generated) / len(generated):.2f} s/token")
        return "\n".join(lines) + "\n\n" + self.latency().table()

    def close(self) -> None:
        """End the session with a server elsewhere, stop a server process (nothing to do in-process)."""
        self._close_bar()
        if not isinstance(self.server, CKKSServer):
            self.server.close()

    def __enter__(self) -> "SecureSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
