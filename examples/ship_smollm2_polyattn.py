"""Ship the recovered polynomial SmolLM2 into the package (`hf_polyattn/assets/smollm2_polyattn/`).

    python benchmarks/conversion_smollm2_cpu.py --out runs/smollm2-recovered   # the recovery (hours)
    python examples/ship_smollm2_polyattn.py --run runs/smollm2-recovered       # this (a minute)

Copies the delta the recovery's polynomial stage wrote (`<run>/polynomial/delta/`: low-rank fp16
changes over the `smollm2` offline checkpoint and the calibrated config), rebuilds the model from it
the way users will (`load_checkpoint("smollm2-polyattn")`), checks that it equals the run's own
polynomial model, and records its greedy continuation of a fixed prompt in `reference.json` (the
slow test compares against it). Every re-ship adds the delta (~50 MB) to the repository's history:
ship rarely.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_polyattn.assets import SMOLLM2_POLYATTN_DIR
from hf_polyattn.conversion.checkpoints import load_checkpoint
from hf_polyattn.training.recovery import DELTA_FOLDER

REFERENCE_PROMPT = "The capital of France is"
REFERENCE_TOKENS = 16


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a recovery folder whose polynomial stage finished")
    parser.add_argument("--out", type=Path, default=SMOLLM2_POLYATTN_DIR)
    args = parser.parse_args(argv)

    delta = args.run / "polynomial" / DELTA_FOLDER
    if not (delta / "delta.json").is_file():
        raise SystemExit(f"{delta} holds no delta: finish the recovery's polynomial stage first")
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(delta, args.out)

    model, tokenizer = load_checkpoint(args.out)
    measured = AutoModelForCausalLM.from_pretrained(args.run / "polynomial").eval()
    ids = tokenizer(REFERENCE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        gap = (model(ids).logits - measured(ids).logits).abs().max().item()
        if gap > 1e-3:
            raise SystemExit(f"the rebuilt model differs from the measured one by {gap:.2e} in logits")
        generated = model.generate(ids, max_new_tokens=REFERENCE_TOKENS, do_sample=False)[0, ids.shape[1] :]
    reference = {
        "prompt": REFERENCE_PROMPT,
        "max_new_tokens": REFERENCE_TOKENS,
        "tokens": generated.tolist(),
        "text": tokenizer.decode(generated),
        "run": str(args.run),
    }
    (args.out / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"shipped {args.out} ({size:.1f} MiB); greedy: {REFERENCE_PROMPT!r} → {reference['text']!r}")
    return args.out


if __name__ == "__main__":
    main()
