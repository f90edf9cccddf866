"""Secure generation of the embedded default model: encrypted vs plaintext, token by token.

    python benchmarks/secure_generation.py                        # 20 new tokens, N=8192
    python benchmarks/secure_generation.py --new-tokens 8 --server process
    python benchmarks/secure_generation.py --server ws://127.0.0.1:8765     # against hf-polyattn serve
    python benchmarks/secure_generation.py --kv-copies 1 --results /tmp/unpacked.md  # one ciphertext per cached token

Greedy generation from the same prompt in plaintext polynomial mode and over CKKS; checks the
tokens are equal, and reports prefill time, time per generated token, bytes each way,
refreshes and the per-operation breakdown. Writes Markdown to --results and a plot next to it.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from hf_polyattn.assets import DEFAULT_MODEL_DIR, load_default_model
from hf_polyattn.ckks import CKKSParameters, SecureSession
from report import command_line, plot_secure_steps, write_results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="ROMEO.")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--ring", type=int, default=8192, help="poly_modulus_degree")
    parser.add_argument("--server", default="in-process",
                        help="in-process, process, or the URL of a running `hf-polyattn serve` (ws://host:port)")
    parser.add_argument("--kv-copies", type=int, default=None,
                        help="in-process: cached positions per KV ciphertext (default: as many as the slots hold; 1: unpacked)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/secure_generation.md"))
    args = parser.parse_args(argv)
    if args.kv_copies is not None and args.server != "in-process":
        parser.error("--kv-copies sets the in-process server's packing; a server elsewhere chooses its own")

    model, tokenizer = load_default_model()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    options = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        start = time.perf_counter()
        plain = model.generate(ids, **options)
        plain_seconds = time.perf_counter() - start

    params = CKKSParameters(poly_modulus_degree=args.ring, levels=CKKSParameters.max_levels(args.ring))
    with SecureSession(model, params, server=args.server, max_tokens=ids.shape[1] + args.new_tokens, progress=True,
                       kv_copies=args.kv_copies) as session:
        start = time.perf_counter()
        secure = model.generate(ids, session=session, **options)
        secure_seconds = time.perf_counter() - start
        latency = session.latency()
        steps = list(session.step_seconds)
        report = session.report()
        packing = session.server.circuit_plan.kv_copies if args.server == "in-process" else None

    prompt_len = ids.shape[1]
    generated = steps[prompt_len:]
    equal = secure.tolist() == plain.tolist()
    command = command_line(__file__, argv)
    rows = [
        "| | plaintext (polynomial form) | CKKS |",
        "|---|---|---|",
        f"| total for {args.new_tokens} new tokens | {plain_seconds:.2f} s | {secure_seconds:.1f} s |",
        f"| prefill ({prompt_len} prompt tokens) | | {sum(steps[:prompt_len]):.1f} s |",
        f"| per generated token (mean, first → last) | {plain_seconds / args.new_tokens * 1e3:.1f} ms | "
        f"{sum(generated) / max(len(generated), 1):.2f} s ({generated[0]:.2f} → {generated[-1]:.2f} s) |",
        f"| refreshes (client round trips) | | {latency.refreshes:,} ({latency.refreshes / len(steps):.0f} per step) |",
        f"| MB to the client / to the server | | {latency.bytes['to_client'] / 1e6:.0f} / {latency.bytes['to_server'] / 1e6:.0f} |",
        f"| tokens equal | | **{equal}** |",
    ]
    text = (
        "# Secure generation with the embedded default model\n\n"
        f"Command: `{command}` (TenSEAL {__import__('tenseal').__version__}, CPU, 2 cores). "
        f"Model: `{DEFAULT_MODEL_DIR.name}` ({model.num_parameters() / 1e6:.2f}M parameters, "
        f"{model.config.num_hidden_layers} layers, d={model.config.hidden_size}, p={model.config.attn_power}). "
        f"Ring N={params.poly_modulus_degree}, chain {list(params.coeff_mod_bit_sizes)} ({params.security}); "
        f"server {args.server}, LM head on the server"
        + (f"; KV cache packed {packing} positions per ciphertext.\n\n" if packing else ".\n\n")
        + f"Prompt `{args.prompt}`; plaintext: `{tokenizer.decode(plain[0], skip_special_tokens=True)!r}`; "
        f"CKKS: `{tokenizer.decode(secure[0], skip_special_tokens=True)!r}`.\n\n"
        + "\n".join(rows)
        + "\n\n## Where the encrypted time goes\n\n"
        + report
        + f"\n\n![time per step and breakdown]({args.results.with_suffix('.png').name})\n"
    )
    write_results(args.results, text)
    plot_secure_steps(steps, prompt_len, latency, args.results.with_suffix(".png"))
    if not equal:
        sys.exit("secure generation diverged from the plaintext tokens")


if __name__ == "__main__":
    main()
