"""Share a PolyAttn model so anyone loads it with `trust_remote_code=True` (no hf_polyattn needed).

    python examples/push_to_hub.py --model runs/tiny-polyattn --repo you/tiny-polyattn
    python examples/push_to_hub.py --model runs/tiny-polyattn --dry-run runs/hub-folder

The push ships config, weights, the model code (modeling_polyattn.py and its imports), the
tokenizer, and a model card tagged `polyattn` (with the scores `hf-polyattn eval` saved in the
folder as its model-index). `--dry-run DIR` writes the same files locally.
"""

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_polyattn.hub import push_to_hub


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--repo", help="the Hub repository id, e.g. you/tiny-polyattn")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", type=Path, metavar="DIR", help="write the files to DIR instead of pushing")
    args = parser.parse_args(argv)
    if not args.repo and not args.dry_run:
        parser.error("give --repo to push, or --dry-run DIR")

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.dry_run:
        model.save_pretrained(args.dry_run)  # every PolyAttn save ships its code
        tokenizer.save_pretrained(args.dry_run)
        print(f"wrote {sorted(p.name for p in args.dry_run.iterdir())}")
        return
    push_to_hub(model, args.repo, tokenizer=tokenizer, private=args.private)
    print(f"pushed to {args.repo}: AutoModelForCausalLM.from_pretrained({args.repo!r}, trust_remote_code=True)")


if __name__ == "__main__":
    main()
