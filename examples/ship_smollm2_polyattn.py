"""Ship the recovered polynomial SmolLM2 into the package (`hf_polyattn/assets/smollm2_polyattn/`).

    python benchmarks/conversion_smollm2_cpu.py --out runs/smollm2-recovered   # the recovery (hours)
    python examples/ship_smollm2_polyattn.py --run runs/smollm2-recovered       # this (a minute)
    python examples/ship_smollm2_polyattn.py --delta DIR                        # or any delta folder

Copies the delta the recovery's polynomial stage wrote (`<run>/polynomial/delta/`: low-rank fp16
changes over the `smollm2` offline checkpoint and the calibrated config) or the delta folder given
(e.g. a GPU run's, `benchmarks/conversion_smollm2_gpu.py`, calibrated), rebuilds the model from it
the way users will (`load_checkpoint("smollm2-polyattn")`), checks that it equals the measured
model (the run's own polynomial model; the folder's own rebuild for `--delta`), and records its
greedy continuation of a fixed prompt in `reference.json` (the slow test compares against it). Every re-ship adds the delta (~50 MB) to the repository's history:
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
from hf_polyattn.conversion.delta import DELTA_FILE, MANIFEST_FILE
from hf_polyattn.training.recovery import DELTA_FOLDER

REFERENCE_PROMPT = "The capital of France is"
REFERENCE_TOKENS = 16


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a recovery folder whose polynomial stage finished")
    source.add_argument("--delta", type=Path, help="a delta folder (delta.json, delta.safetensors, calibrated config.json)")
    parser.add_argument("--out", type=Path, default=SMOLLM2_POLYATTN_DIR)
    args = parser.parse_args(argv)

    delta = args.delta or args.run / "polynomial" / DELTA_FOLDER
    if not (delta / MANIFEST_FILE).is_file():
        raise SystemExit(f"{delta} holds no delta" + ("" if args.delta else ": finish the recovery's polynomial stage first"))
    if args.run:
        measured = AutoModelForCausalLM.from_pretrained(args.run / "polynomial").eval()
    else:
        measured = load_checkpoint(delta)[0]
        if not measured.config.polynomial:
            raise SystemExit(f"{delta} is not calibrated: the shipped model is the polynomial form")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    for name in ("config.json", MANIFEST_FILE, DELTA_FILE):  # what load_checkpoint reads, nothing else
        shutil.copy2(delta / name, args.out / name)

    model, tokenizer = load_checkpoint(args.out)
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
        "source": str(args.run or args.delta),
    }
    (args.out / "reference.json").write_text(json.dumps(reference, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    print(f"shipped {args.out} ({size:.1f} MiB); greedy: {REFERENCE_PROMPT!r} → {reference['text']!r}")
    return args.out


if __name__ == "__main__":
    main()
