"""`hf-polyattn serve` under load: concurrent sessions of the embedded model over localhost.

    python benchmarks/secure_server_load.py                          # 1, 2, 4, 8 sessions; 100 sequential
    python benchmarks/secure_server_load.py --concurrency 1 2 --sequential 10

Starts `hf-polyattn serve` in its own process on 127.0.0.1 (the embedded default model), then
for each concurrency level runs that many client threads at once, each with its own keys,
generating greedily from its own prompt; checks every session's tokens against plaintext and
reports tokens per second overall, p50/p95 seconds per encrypted step and bytes per token
(ciphertexts both ways, refreshes included). Then runs sequential one-step sessions and records
the server's resident memory after each: it must stay flat. Writes Markdown to --results and a
plot next to it.
"""

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from hf_polyattn.assets import DEFAULT_MODEL_DIR, load_default_model
from hf_polyattn.ckks import CKKSClient, SecureSession
from hf_polyattn.ckks.remote import ServiceProcess
from report import command_line, write_results

PROMPT_TOKEN = 5  # the sequential sessions' single step
PROMPTS = ["ROMEO.", "KING", "First", "JULIET", "Second", "All", "MENENIUS", "Citizen"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def run_concurrent(url: str, model, prompts: list[torch.Tensor], clients: list[CKKSClient], new_tokens: int) -> dict:
    """`len(prompts)` sessions at once; their step times, bytes and whether tokens match plaintext."""
    outcomes: list[dict | None] = [None] * len(prompts)

    def one(index: int) -> None:
        try:
            with SecureSession(model, client=clients[index], server=url,
                               max_tokens=prompts[index].shape[1] + new_tokens) as session:
                with torch.no_grad():
                    out = model.generate(prompts[index], max_new_tokens=new_tokens, do_sample=False, session=session)
                latency = session.latency()
                outcomes[index] = {"tokens": out.tolist(), "steps": list(session.step_seconds),
                                   "bytes": latency.bytes["to_client"] + latency.bytes["to_server"]}
        except Exception as error:  # noqa: BLE001  (reported in the table)
            outcomes[index] = {"error": f"{type(error).__name__}: {error}"}

    threads = [threading.Thread(target=one, args=(index,)) for index in range(len(prompts))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    errors = [outcome["error"] for outcome in outcomes if "error" in outcome]
    if errors:
        raise RuntimeError(f"{len(errors)} sessions failed: {errors[0]}")
    steps = [seconds for outcome in outcomes for seconds in outcome["steps"]]
    with torch.no_grad():
        plain = [model.generate(prompt, max_new_tokens=new_tokens, do_sample=False).tolist() for prompt in prompts]
    return {
        "sessions": len(prompts), "wall": wall, "steps": len(steps), "tokens_per_s": len(steps) / wall,
        "p50": float(np.percentile(steps, 50)), "p95": float(np.percentile(steps, 95)),
        "mb_per_token": sum(outcome["bytes"] for outcome in outcomes) / len(steps) / 1e6,
        "equal": all(outcome["tokens"] == reference for outcome, reference in zip(outcomes, plain)),
    }


def run_sequential(url: str, model, client: CKKSClient, sessions: int, pid: int) -> list[float]:
    """`sessions` one-step sessions one after another; the server's RSS (MB) after each."""
    memory = [rss_mb(pid)]
    for _ in range(sessions):
        with SecureSession(model, client=client, server=url, max_tokens=1) as session:
            session.logits(torch.tensor([PROMPT_TOKEN]))
        time.sleep(0.3)  # the server frees a session once its handler sees the close
        memory.append(rss_mb(pid))
    return memory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--new-tokens", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=2)
    parser.add_argument("--sequential", type=int, default=100, help="one-step sessions for the memory check")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/secure_server_load.md"))
    args = parser.parse_args(argv)
    if max(args.concurrency) > len(PROMPTS):
        parser.error(f"at most {len(PROMPTS)} concurrent sessions (one prompt each)")

    model, tokenizer = load_default_model()
    prompts = [tokenizer(text, return_tensors="pt").input_ids[:, : args.prompt_tokens] for text in PROMPTS]
    clients = [CKKSClient() for _ in range(max(args.concurrency))]
    service = ServiceProcess(DEFAULT_MODEL_DIR, "--max-sessions", str(max(args.concurrency)))
    try:
        start_rss = rss_mb(service.pid)
        rows = []
        for count in args.concurrency:
            row = run_concurrent(service.url, model, prompts[:count], clients, args.new_tokens)
            time.sleep(1.0)  # every handler has ended its session
            row["server_mb"] = rss_mb(service.pid)
            rows.append(row)
            print(f"{count} sessions: {row['tokens_per_s']:.2f} tokens/s, p50 {row['p50']:.2f} s, "
                  f"p95 {row['p95']:.2f} s, {row['mb_per_token']:.1f} MB/token, tokens equal {row['equal']}", flush=True)
        memory = run_sequential(service.url, model, clients[0], args.sequential, service.pid)
    finally:
        service.stop()

    steps = args.prompt_tokens + args.new_tokens - 1
    table = [
        "| sessions at once | encrypted steps | wall s | tokens/s overall | p50 s/token | p95 s/token | MB/token | "
        "server RSS after (MB) | tokens equal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        table.append(f"| {row['sessions']} | {row['steps']} | {row['wall']:.1f} | {row['tokens_per_s']:.2f} | "
                     f"{row['p50']:.2f} | {row['p95']:.2f} | {row['mb_per_token']:.1f} | {row['server_mb']:.0f} | "
                     f"**{row['equal']}** |")
    tail = memory[len(memory) // 2 :]
    slope = np.polyfit(range(len(tail)), tail, 1)[0] if len(tail) > 1 else 0.0
    marks = sorted({1, 10, len(memory) // 2, len(memory) - 1} & set(range(1, len(memory))))
    text = (
        "# `hf-polyattn serve` under load (embedded default model, localhost)\n\n"
        f"Command: `{command_line(__file__, argv)}` (CPU, 2 cores: the server process and every client thread share them). "
        f"Server: `hf-polyattn serve` in its own process on 127.0.0.1, N=8192; each session has its own keys and "
        f"generates {args.new_tokens} tokens greedily from a {args.prompt_tokens}-token prompt ({steps} encrypted steps). "
        "Seconds per token are per encrypted step, as each client sees it (refresh round trips included); "
        "bytes count ciphertexts both ways, refreshes included. The server runs sessions in threads that share one "
        "interpreter (and SEAL holds the GIL through each operation), so throughput stays that of one session: "
        "sessions take turns. Server memory keeps the high-water mark of the sessions open at once (SEAL's "
        "global memory pool and the allocator keep freed memory for reuse) and does not grow past it.\n\n"
        + "\n".join(table)
        + f"\n\n## Server memory over {args.sequential} sequential sessions\n\n"
        f"Resident memory of the server process: {start_rss:.0f} MB before the first session, "
        f"{rows[-1]['server_mb']:.0f} MB after the concurrency rows; then "
        + ", ".join(f"{memory[mark]:.0f} MB after session {mark}" for mark in marks)
        + f"; over the second half the trend is {slope:+.2f} MB per session "
        f"(median of the second half {statistics.median(tail):.0f} MB).\n\n"
        f"![throughput and memory]({args.results.with_suffix('.png').name})\n"
    )
    write_results(args.results, text)
    _plot(rows, memory, args.results.with_suffix(".png"))
    if not all(row["equal"] for row in rows):
        sys.exit("a session's tokens differ from plaintext")


def _plot(rows: list[dict], memory: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    sessions = [row["sessions"] for row in rows]
    left.plot(sessions, [row["tokens_per_s"] for row in rows], marker="o")
    left.set_xlabel("sessions at once")
    left.set_ylabel("encrypted tokens per second (all sessions)")
    left.set_title("throughput")
    middle.plot(sessions, [row["p50"] for row in rows], marker="o", label="p50")
    middle.plot(sessions, [row["p95"] for row in rows], marker="s", label="p95")
    middle.set_xlabel("sessions at once")
    middle.set_ylabel("seconds per token, per session")
    middle.set_title("latency")
    middle.legend()
    right.plot(range(len(memory)), memory)
    right.set_xlabel("sequential sessions served")
    right.set_ylabel("server resident memory (MB)")
    right.set_title("memory stays flat")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
