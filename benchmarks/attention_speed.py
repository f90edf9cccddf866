"""Power-Softmax attention vs PyTorch SDPA softmax attention: time and peak memory.

    python benchmarks/attention_speed.py                                  # CPU, T = 512 … 4096
    python benchmarks/attention_speed.py --device cuda --dtype bfloat16 --lengths 512 2048 8192 --heads 16

Causal attention of `--heads` heads of dimension `--head-dim` on one sequence: the eager
Power-Softmax path (`power_softmax_attention_forward`, what PolyAttn runs by default) and, on
CUDA, the fused Triton kernel (`attn_implementation="power_softmax_triton"`) against
`torch.nn.functional.scaled_dot_product_attention`, forward and forward+backward, best of
--repeats. Peak memory is measured on CUDA only (`torch.cuda.max_memory_allocated`); on the CPU
the table gives the size of the score matrix the eager path materialises instead.

Then whole models (`--model-hidden`, `--model-layers`): training tokens/s (forward, backward,
AdamW step) of a PolyAttn model with each attention against the same-shape Llama with SDPA.
Writes Markdown to --results.
"""

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from transformers import LlamaConfig, LlamaForCausalLM

from hf_polyattn import PolyAttnConfig, PolyAttnForCausalLM
from hf_polyattn.modeling.power_softmax import power_softmax_attention_forward
from report import command_line, write_results


def _module(power: int) -> SimpleNamespace:
    config = SimpleNamespace(attn_power=power, attn_eps=1e-6, attn_form="sum", attn_stable_scaling=True, attn_scale_delta=1e-6)
    return SimpleNamespace(config=config, training=False, is_causal=True)


def _power_softmax(module):
    def run(q, k, v):
        return power_softmax_attention_forward(module, q, k, v, attention_mask=None)[0]

    return run


def _fused(module, **launch):
    from hf_polyattn.kernels.power_softmax_triton import fused_power_softmax_attention

    config = module.config

    def run(q, k, v):
        out = fused_power_softmax_attention(q, k, v, q.shape[-1] ** -0.5, config.attn_power, config.attn_eps, **launch)
        return out.transpose(1, 2)

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


def _attention_table(args, dtype) -> list[str]:
    module = _module(args.power)
    implementations = {"eager power-softmax": _power_softmax(module)}
    if args.device == "cuda":
        implementations["fused power-softmax (Triton)"] = _fused(module)
    names = list(implementations)
    implementations["SDPA"] = _sdpa
    header = " | ".join(f"{name}: fwd / fwd+bwd ms (× SDPA)" for name in names)
    check = len(names) > 1  # the fused kernel against the eager path: outputs and gradients
    lines = [f"| T | {header} | SDPA: fwd / fwd+bwd ms | peak MB ({' / '.join(names)} / SDPA) or T×T scores |"
             + (" fused vs eager: max rel. error out / dq / dk / dv |" if check else "")]
    lines.append("|---|" + "---|" * (len(names) + 2 + check))
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        shape = (1, args.heads, length, args.head_dim)
        q, k, v = (torch.randn(shape, generator=generator).to(args.device, dtype).requires_grad_() for _ in range(3))
        row = {}
        for name, function in implementations.items():
            with torch.no_grad():  # warm-up (and Triton's compilation)
                function(q, k, v)
            with torch.no_grad():
                row[name, "fwd"] = _timed(function, q, k, v, False, args.repeats, args.device)
            row[name, "bwd"] = _timed(function, q, k, v, True, args.repeats, args.device)
        sdpa_fwd, sdpa_bwd = row["SDPA", "fwd"][0], row["SDPA", "bwd"][0]
        cells = [
            f"{row[n, 'fwd'][0] * 1e3:.1f} / {row[n, 'bwd'][0] * 1e3:.1f} "
            f"({row[n, 'fwd'][0] / sdpa_fwd:.1f}× / {row[n, 'bwd'][0] / sdpa_bwd:.1f}×)"
            for n in names
        ]
        if args.device == "cuda":
            memory = " / ".join(f"{row[n, 'bwd'][1]:.0f}" for n in implementations)
        else:
            memory = f"{args.heads * length * length * torch.finfo(dtype).bits / 8 / 2**20:.0f} MB of scores"
        errors = " " + " / ".join(f"{e:.1e}" for e in _relative_errors(*(implementations[name] for name in names), q, k, v)) + " |" if check else ""
        lines.append(f"| {length} | " + " | ".join(cells) + f" | {sdpa_fwd * 1e3:.1f} / {sdpa_bwd * 1e3:.1f} | {memory} |" + errors)
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def _device_name(device: str) -> str:
    return f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""


def _relative_errors(reference, candidate, q, k, v) -> list[float]:
    """max |candidate − reference| / max |reference| of the output and of dq, dk, dv (same upstream gradient)."""
    results = []
    for function in (reference, candidate):
        for tensor in (q, k, v):
            tensor.grad = None
        out = function(q, k, v)
        out.float().pow(2).mean().backward()
        results.append([out.detach().float()] + [tensor.grad.float() for tensor in (q, k, v)])
    return [float((c - r).abs().max() / r.abs().max()) for r, c in zip(*results)]


def _sweep_table(args, dtype) -> list[str]:
    """The fused kernel's forward+backward time for each `--sweep` launch shape, × SDPA."""
    from hf_polyattn.kernels.power_softmax_triton import BLOCK_M, BLOCK_N, NUM_WARPS

    module = _module(args.power)
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.sweep]
    default = (BLOCK_M, BLOCK_N, NUM_WARPS)
    lines = ["| T | " + " | ".join("×".join(map(str, shape)) + (" (default)" if shape == default else "") for shape in shapes)
             + " | SDPA |", "|---|" + "---|" * (len(shapes) + 1)]
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        shape = (1, args.heads, length, args.head_dim)
        q, k, v = (torch.randn(shape, generator=generator).to(args.device, dtype).requires_grad_() for _ in range(3))
        sdpa = _timed(_sdpa, q, k, v, True, args.repeats, args.device)[0]
        cells = []
        for launch in shapes:
            function = _fused(module, blocks=launch)
            with torch.no_grad():
                function(q, k, v)  # compiles this shape
            seconds = _timed(function, q, k, v, True, args.repeats, args.device)[0]
            cells.append(f"{seconds * 1e3:.2f} ms ({seconds / sdpa:.2f}×)")
        lines.append(f"| {length} | " + " | ".join(cells) + f" | {sdpa * 1e3:.2f} ms |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def _training_tokens_per_second(model, args, steps: int = 3) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(4, model.config.vocab_size, (args.model_batch, args.model_length), device=args.device)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return steps * ids.numel() / (time.perf_counter() - start)


def _model_table(args) -> list[str]:
    fields = dict(
        vocab_size=args.model_vocab, hidden_size=args.model_hidden, intermediate_size=4 * args.model_hidden,
        num_hidden_layers=args.model_layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=args.model_length, attn_power=args.power,
    )
    implementations = ["power_softmax"] + (["power_softmax_triton"] if args.device == "cuda" else [])
    rows = {}
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in fields.items() if k != "attn_power"})).to(args.device)
    llama.set_attn_implementation("sdpa")
    rows["Llama, SDPA softmax"] = _training_tokens_per_second(llama, args)
    del llama
    for implementation in implementations:
        model = PolyAttnForCausalLM(PolyAttnConfig(**fields)).to(args.device)
        model.set_attn_implementation(implementation)
        rows[f"PolyAttn, {implementation}"] = _training_tokens_per_second(model, args)
        del model
    reference = rows["Llama, SDPA softmax"]
    lines = ["| model | training tokens/s | × Llama |", "|---|---|---|"]
    lines += [f"| {name} | {speed:,.0f} | {speed / reference:.2f} |" for name, speed in rows.items()]
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--power", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-hidden", type=int, default=256)
    parser.add_argument("--model-layers", type=int, default=4)
    parser.add_argument("--model-length", type=int, default=512)
    parser.add_argument("--model-batch", type=int, default=4)
    parser.add_argument("--model-vocab", type=int, default=8192)
    parser.add_argument("--sweep", nargs="*", default=[], metavar="MxNxW",
                        help="CUDA: also time the fused kernel's fwd+bwd for these launch shapes "
                             "(queries per program × keys per step × warps), e.g. 64x64x4 128x64x8")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/attention_speed.md"))
    args = parser.parse_args(argv)
    if args.sweep and args.device != "cuda":
        parser.error("--sweep times the fused kernel, which runs on CUDA only")
    dtype = getattr(torch, args.dtype)
    attention = _attention_table(args, dtype)
    sweep = _sweep_table(args, dtype) if args.sweep else []
    models = _model_table(args)
    command = command_line(__file__, argv)
    text = (
        "# Attention speed: Power-Softmax vs SDPA softmax\n\n"
        f"Command: `{command}` (torch {torch.__version__}, device {args.device}{_device_name(args.device)}, {args.dtype}, "
        f"{torch.get_num_threads()} threads; {args.heads} heads × {args.head_dim}, causal, batch 1, p={args.power}; "
        "best of the repeats). The fused Triton kernel runs on CUDA only.\n\n" + "\n".join(attention) + "\n\n"
        + ("## Fused kernel launch shapes: forward+backward (× SDPA)\n\n" + "\n".join(sweep) + "\n\n" if sweep else "")
        + f"## Training a whole model (d={args.model_hidden}, {args.model_layers} layers, {args.heads} heads, "
        f"batch {args.model_batch} × {args.model_length} tokens, AdamW; mean of 3 steps after a warm-up)\n\n"
        + "\n".join(models) + "\n"
    )
    write_results(args.results, text)


if __name__ == "__main__":
    main()
