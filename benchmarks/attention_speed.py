"""Power-Softmax attention vs PyTorch SDPA softmax attention: time and peak memory.

    python benchmarks/attention_speed.py                                  # CPU, T = 512 … 4096
    python benchmarks/attention_speed.py --device cuda --dtype bfloat16 --lengths 512 2048 8192 --heads 16

Causal attention of `--heads` heads of dimension `--head-dim` on one sequence: the eager
Power-Softmax path (`power_softmax_attention_forward`, what PolyAttn runs) against
`torch.nn.functional.scaled_dot_product_attention`, forward and forward+backward, best of
--repeats. Peak memory is measured on CUDA only (`torch.cuda.max_memory_allocated`); on the CPU
the table gives the size of the score matrix the eager path materialises instead. Writes
Markdown to --results.
"""

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from hf_polyattn.modeling.power_softmax import power_softmax_attention_forward
from report import command_line, write_results


def _module(power: int) -> SimpleNamespace:
    config = SimpleNamespace(attn_power=power, attn_eps=1e-6, attn_form="sum", attn_stable_scaling=True, attn_scale_delta=1e-6)
    return SimpleNamespace(config=config, training=False, is_causal=True)


def _power_softmax(module):
    def run(q, k, v):
        return power_softmax_attention_forward(module, q, k, v, attention_mask=None)[0]

    return run


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def _timed(function, q, k, v, backward: bool, repeats: int, device: str) -> tuple[float, float | None]:
    best, peak = float("inf"), None
    for _ in range(repeats):
        for tensor in (q, k, v):
            tensor.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = function(q, k, v)
        if backward:
            out.float().pow(2).mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        best = min(best, time.perf_counter() - start)
    return best, peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--power", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/attention_speed.md"))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    power_softmax = _power_softmax(_module(args.power))
    lines = [
        "| T | forward: power-softmax / SDPA (ms) | ratio | fwd+bwd: power-softmax / SDPA (ms) | ratio | peak MB (power-softmax / SDPA) or T×T scores |",
        "|---|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        shape = (1, args.heads, length, args.head_dim)
        q, k, v = (torch.randn(shape, generator=generator).to(args.device, dtype).requires_grad_() for _ in range(3))
        with torch.no_grad():  # warm-up
            power_softmax(q, k, v), _sdpa(q, k, v)
        row = {}
        for name, function in (("power", power_softmax), ("sdpa", _sdpa)):
            with torch.no_grad():
                row[name, "fwd"] = _timed(function, q, k, v, False, args.repeats, args.device)
            row[name, "bwd"] = _timed(function, q, k, v, True, args.repeats, args.device)
        if args.device == "cuda":
            memory = f"{row['power', 'bwd'][1]:.0f} / {row['sdpa', 'bwd'][1]:.0f}"
        else:
            memory = f"{args.heads * length * length * torch.finfo(dtype).bits / 8 / 2**20:.0f} MB of scores"
        lines.append(
            f"| {length} | {row['power', 'fwd'][0] * 1e3:.1f} / {row['sdpa', 'fwd'][0] * 1e3:.1f} | "
            f"{row['power', 'fwd'][0] / row['sdpa', 'fwd'][0]:.1f}× | "
            f"{row['power', 'bwd'][0] * 1e3:.1f} / {row['sdpa', 'bwd'][0] * 1e3:.1f} | "
            f"{row['power', 'bwd'][0] / row['sdpa', 'bwd'][0]:.1f}× | {memory} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    command = command_line(__file__, argv)
    text = (
        "# Attention speed: eager Power-Softmax vs SDPA softmax\n\n"
        f"Command: `{command}` (torch {torch.__version__}, device {args.device}, {args.dtype}, "
        f"{torch.get_num_threads()} threads; {args.heads} heads × {args.head_dim}, causal, batch 1, p={args.power}; "
        "best of the repeats).\n\n" + "\n".join(lines) + "\n"
    )
    write_results(args.results, text)


if __name__ == "__main__":
    main()
