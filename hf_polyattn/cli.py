"""`hf-polyattn`: inspect PolyAttn models and generate with them from the command line."""

import argparse
import sys
from collections.abc import Sequence


def _info(args: argparse.Namespace) -> int:
    import peft
    import torch
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    import hf_polyattn
    from hf_polyattn import ATTENTION_NAME, PolyAttnConfig

    print(f"hf_polyattn   {hf_polyattn.__version__}")
    print(f"torch         {torch.__version__}")
    print(f"transformers  {transformers.__version__}")
    print(f"peft          {peft.__version__}")
    print("registered:")
    print(f"  AutoConfig[{PolyAttnConfig.model_type!r}]          -> {CONFIG_MAPPING[PolyAttnConfig.model_type].__name__}")
    print(f"  AutoModel[PolyAttnConfig]            -> {MODEL_MAPPING[PolyAttnConfig].__name__}")
    print(f"  AutoModelForCausalLM[PolyAttnConfig] -> {MODEL_FOR_CAUSAL_LM_MAPPING[PolyAttnConfig].__name__}")
    print(f"  AttentionInterface[{ATTENTION_NAME!r}]     -> {AttentionInterface._global_mapping[ATTENTION_NAME].__name__}")
    print(f"  AttentionMaskInterface[{ATTENTION_NAME!r}] -> {AttentionMaskInterface._global_mapping[ATTENTION_NAME].__name__}")
    if args.model:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
        print(f"model {args.model}: {config.model_type}, {config.num_hidden_layers} layers, d={config.hidden_size}")
        if config.model_type == PolyAttnConfig.model_type:
            print(f"  attention: p={config.attn_power}, eps={config.attn_eps}, form={config.attn_form}")
            print(f"  polynomial form: {'yes' if config.polynomial else 'no (exact)'}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import hf_polyattn  # noqa: F401  (registers the Auto classes)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_k=None if args.temperature == 0 else 50,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-polyattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions, registered classes, and a model's attention setup")
    info.add_argument("--model", help="a saved model folder to describe")
    info.set_defaults(run=_info)

    generate = commands.add_parser("generate", help="generate text from a saved model folder")
    generate.add_argument("prompt")
    generate.add_argument("--model", required=True, help="folder with the model and its tokenizer")
    generate.add_argument("--max-new-tokens", type=int, default=40)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(run=_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        print("hf-polyattn: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
