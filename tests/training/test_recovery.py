"""The one-call recipe (convert → transfer → distill → polynomial form → scores) on a tiny Llama."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState

from hf_polyattn.cli import main as cli_main
from hf_polyattn.conversion.checkpoints import load_checkpoint
from hf_polyattn.conversion.delta import DELTA_FILE
from hf_polyattn.training.distill import HeldOutCurve
from hf_polyattn.training.recovery import (
    CACHE_TOKENS_PER_SECOND, CALIBRATION_TOKENS_PER_SECOND, DISTILL_TOKENS_PER_SECOND, EVAL_SECONDS_PER_ITEM,
    HELD_OUT_TOKENS_PER_SECOND, STAGES, Recovery, RecoverySettings, format_recovery_table, parse_budget,
)
from tests.helpers import save_tiny_llama

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = dict(transfer_tokens=2048, transfer_block=64, distill_block=64, calibration_blocks=16, calibration_block=64,
             tasks=("piqa", "lambada"), eval_limit=6, quick_eval_limit=4, held_out_blocks=4, held_out_block=64,
             distill_max_tokens=40 * 4 * 64, distill_lr=3e-3, delta_rank=4)


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory, python_docs):
    root = tmp_path_factory.mktemp("recovery")
    text = "\n".join(python_docs[:60])
    (root / "text.txt").write_text(text)
    save_tiny_llama(root / "llama", text, vocab_size=400, max_position_embeddings=512)
    return root


def settings(root, **overrides) -> RecoverySettings:
    return RecoverySettings(**{"teacher": str(root / "llama"), "data": [str(root / "text.txt")], **SMALL, **overrides})


def test_parse_budget():
    assert parse_budget("2h30m") == 9000 and parse_budget("90m") == 5400 and parse_budget("45") == 45
    for bad in ("", "2x", "0m", "-5"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_a_few_shot_share_outside_0_1_is_refused_before_any_work(teacher_folder, tmp_path):
    for share in (1.0, -0.1):
        with pytest.raises(ValueError, match="fewshot_share must be in"):
            Recovery(settings(teacher_folder, fewshot_share=share), tmp_path / "out", progress=False)
    assert cli_main(["convert", "--from", str(teacher_folder / "llama"), "--out", str(tmp_path / "cli"), "--recover",
                     "--fewshot-share", "1"]) == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


def test_a_budget_too_small_for_one_stage_is_refused_before_any_work(teacher_folder, tmp_path):
    with pytest.raises(ValueError, match="too small for the next stage .transferred"):
        Recovery(settings(teacher_folder), tmp_path / "out", progress=False).run(5)
    assert not (tmp_path / "out").exists()


def test_recovery_runs_every_stage_then_resumes_without_redoing_them(teacher_folder, tmp_path):
    out = tmp_path / "out"
    # enough for attention transfer but not for the distillation's minimum: stops at a boundary
    state = Recovery(settings(teacher_folder), out, progress=False).run(200)
    assert list(state["stages"]) == ["transferred"]
    assert "stopped at a stage boundary" in state["runs"][-1]["stopped"]
    transferred = AutoModelForCausalLM.from_pretrained(out / "transferred").state_dict()

    state = Recovery(settings(teacher_folder), out, progress=False).run(2000)
    assert list(state["stages"]) == list(STAGES)
    kept = AutoModelForCausalLM.from_pretrained(out / "transferred").state_dict()
    assert kept.keys() == transferred.keys() and all(torch.equal(t, kept[n]) for n, t in transferred.items())
    rows = state["rows"]
    assert list(rows) == ["teacher", "converted", *STAGES]
    assert rows["teacher"]["kl"] == pytest.approx(0, abs=1e-5)
    assert rows["transferred"]["kl"] < rows["converted"]["kl"]
    assert rows["distilled"]["kl"] < 0.7 * rows["converted"]["kl"]
    assert state["stages"]["distilled"]["fewshot_share"] == pytest.approx(0.3, abs=0.05)  # episodes in the mix
    # the distillation was planned from this teacher's cache rate, timed here, not SmolLM2's constants
    plan, tokens_per_step = state["distill_plan"], SMALL["distill_block"] * 4
    assert plan["distill_tokens_per_second"] == pytest.approx(plan["cache_tokens_per_second"] * DISTILL_TOKENS_PER_SECOND
                                                              / CACHE_TOKENS_PER_SECOND)
    # the seconds it divides exclude the range loss's calibration
    speed = plan["calibration_seconds"] / (16 * 64 / CALIBRATION_TOKENS_PER_SECOND)  # the scored rows' pace
    assert 0.25 <= speed <= 4
    fitting = int(plan["seconds"] / (1 / plan["cache_tokens_per_second"] + 1 / plan["distill_tokens_per_second"]) / tokens_per_step)
    assert state["distill_steps"] == min(max(1, fitting), SMALL["distill_max_tokens"] // tokens_per_step)
    assert [rows[row]["piqa"]["n"] for row in rows] == [6, 4, 4, 4, 6]  # reference and final rows vs the others
    # the quality-vs-time curve: held-out KL at 4 points of the 40 steps, the last one the distilled row's
    curve = state["stages"]["distilled"]["held_out_curve"]
    assert [point["step"] for point in curve] == [10, 20, 30, 40] and curve[-1]["tokens"] == 40 * tokens_per_step
    assert curve[-1]["kl"] == pytest.approx(rows["distilled"]["kl"], rel=1e-4) and curve[-1]["kl"] < curve[0]["kl"]
    assert all(a["seconds"] < b["seconds"] for a, b in zip(curve, curve[1:]))
    polynomial = AutoModelForCausalLM.from_pretrained(out / "polynomial")
    assert polynomial.is_polynomial and polynomial.config.polynomial["calibrated"]
    fidelity = state["stages"]["polynomial"]["fidelity"]
    assert fidelity["top1_agreement"] > 0.9
    # what ships (rank-4 changes over the teacher) is exactly the model the polynomial row measured
    shipped, _ = load_checkpoint(out / "polynomial" / "delta")
    assert any(name.endswith(".delta_left") for name in load_file(out / "polynomial" / "delta" / DELTA_FILE))
    assert all(torch.equal(t, polynomial.state_dict()[n]) for n, t in shipped.state_dict().items())
    assert shipped.config.polynomial == polynomial.config.polynomial
    # the ship script copies it (from the run, or from any delta folder), checks it against the
    # measured model and records its greedy continuation
    for source in (["--run", str(out)], ["--delta", str(out / "polynomial" / "delta")]):
        shipped_dir = tmp_path / f"shipped{source[0]}"
        saved, sys.argv = sys.argv, ["ship", *source, "--out", str(shipped_dir)]
        try:
            runpy.run_path(str(EXAMPLES / "ship_smollm2_polyattn.py"), run_name="__main__")
        finally:
            sys.argv = saved
        reference = json.loads((shipped_dir / "reference.json").read_text())
        ids = AutoTokenizer.from_pretrained(out / "polynomial")(reference["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            greedy = polynomial.eval().generate(ids, max_new_tokens=reference["max_new_tokens"], do_sample=False)
        assert reference["tokens"] == greedy[0, ids.shape[1] :].tolist()
        assert sorted(path.name for path in shipped_dir.iterdir()) == ["config.json", "delta.json", DELTA_FILE, "reference.json"]
    table = format_recovery_table(json.loads((out / "state.json").read_text()))
    assert table.count("\n") == 1 + len(rows) and "| polynomial |" in table

    again = Recovery(settings(teacher_folder), out, progress=False).run(60)  # nothing left to do
    assert again["stages"] == state["stages"]

    # a run stopped while scoring its last stage: the next one scores it, the same
    interrupted = json.loads((out / "state.json").read_text())
    del interrupted["rows"]["polynomial"]
    (out / "state.json").write_text(json.dumps(interrupted))
    with pytest.raises(ValueError, match="too small for the scores of polynomial"):  # its scoring counts
        Recovery(settings(teacher_folder), out, progress=False).run(1)
    rescored = Recovery(settings(teacher_folder), out, progress=False).run(600)
    assert rescored["stages"] == state["stages"]
    row, before = rescored["rows"]["polynomial"], rows["polynomial"]
    assert row["kl"] == pytest.approx(before["kl"], rel=1e-5) and row["piqa"] == before["piqa"]

    # redo the last stage (e.g. after the approximations changed): only it runs again, from the distilled model
    recovery = Recovery(settings(teacher_folder), out, progress=False)
    recovery.redo("polynomial")
    assert list(recovery.state["stages"]) == ["transferred", "distilled"] and "polynomial" not in recovery.state["rows"]
    redone = recovery.run(600)
    assert list(redone["stages"]) == list(STAGES) and redone["stages"]["distilled"] == state["stages"]["distilled"]
    assert redone["runs"][-1]["stages"] == ["polynomial"] and "polynomial" in redone["rows"]
    with pytest.raises(ValueError, match="unknown stage 'calibrated'"):
        recovery.redo("calibrated")


@pytest.mark.parametrize("slower, planned_at", [(3.0, 3.0), (100.0, 4.0), (0.5, 0.5)])
def test_later_stages_are_planned_at_the_speed_the_scored_rows_ran(teacher_folder, tmp_path, slower, planned_at):
    recovery = Recovery(settings(teacher_folder), tmp_path / "out", progress=False)
    at_constants = recovery.estimate("polynomial")
    # the teacher row of this machine took `slower` times its plan (6 items of piqa and lambada, held-out blocks)
    planned = 6 * (EVAL_SECONDS_PER_ITEM["piqa"] + EVAL_SECONDS_PER_ITEM["lambada"]) + 4 * 64 / HELD_OUT_TOKENS_PER_SECOND
    recovery.state["rows"]["teacher"] = {"piqa": {"n": 6}, "lambada": {"n": 6}, "seconds": slower * planned}
    assert recovery.estimate("polynomial") == pytest.approx(planned_at * at_constants)  # clipped to 4x


def test_resuming_with_another_power_or_teacher_names_the_mismatch(teacher_folder, tmp_path):
    out = tmp_path / "out"
    Recovery(settings(teacher_folder), out, progress=False).run(200)
    with pytest.raises(ValueError, match="attn_power: the run in .* was made with 4, this one asks for 6"):
        Recovery(settings(teacher_folder, attn_power=6), out, progress=False)
    with pytest.raises(ValueError, match="teacher: "):
        Recovery(settings(teacher_folder, teacher="smollm2"), out, progress=False)


def test_cli_convert_recover_reports_a_small_budget(teacher_folder, tmp_path, capsys):
    argv = ["convert", "--from", str(teacher_folder / "llama"), "--out", str(tmp_path / "out"), "--recover",
            "--budget", "10s", "--data", str(teacher_folder / "text.txt")]
    assert cli_main(argv) == 2
    assert "too small for the next stage" in capsys.readouterr().err
    assert cli_main([*argv[:-4], "--budget", "soon"]) == 2


def test_the_held_out_curve_measures_at_its_points_and_keeps_them_across_a_resume(tmp_path):
    model, seen = nn.Linear(2, 2).train(), []

    def measure(module):
        seen.append((module.training, torch.is_grad_enabled()))
        return {"kl": 1.0 / (len(seen) + 1)}

    def train(first_step, last_step, stop_at=None):
        curve = HeldOutCurve(measure, tmp_path / "curve.json", points=4, tokens_per_step=10)
        state, control = TrainerState(max_steps=8, global_step=first_step - 1), TrainerControl()
        curve.on_train_begin(None, state, control)
        for step in range(first_step, last_step + 1):
            state.global_step, control.should_training_stop = step, step == stop_at
            curve.on_step_end(None, state, control, model=model)
        return [point["step"] for point in curve.curve]

    assert train(1, 5, stop_at=5) == [2, 4, 5]  # a deadline's stop is measured too
    assert seen == [(False, False)] * 3 and model.training  # eval mode, no gradients, then back
    # resumed from the checkpoint of step 3: the points after it are dropped and taken again
    assert train(4, 8) == [2, 4, 6, 8]
    assert [point["step"] for point in json.loads((tmp_path / "curve.json").read_text())] == [2, 4, 6, 8]
