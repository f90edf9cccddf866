"""`accelerate launch` with 2 CPU processes (torchrun + gloo) runs the training example and distillation."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_polyattn.cli import main as cli_main
from tests.helpers import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(tmp_path: Path, *command: str) -> str:
    """Run `command` under `accelerate launch` with 2 processes on the CPU; its combined output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # --multi_gpu is accelerate's switch for several processes; without a GPU they run on the CPU (gloo)
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
    ]
    result = subprocess.run([*launch, *command], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def assert_both_ranks_ran(output: str) -> None:
    assert set(re.findall(r"rank (\d)/2", output)) == {"0", "1"}, output[-2000:]


def test_train_tiny_example_on_two_processes(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    output = accelerate_launch(
        tmp_path, str(ROOT / "examples" / "train_tiny.py"), "--text", "text.txt", "--out", "tiny", "--steps", "30",
        "--lr", "1e-2", "--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--vocab", "300",
        "--block", "32", "--batch", "4",
    )
    assert_both_ranks_ran(output)
    before, after = map(float, re.search(r"perplexity ([\d.]+) before -> ([\d.]+) after", output).groups())
    assert after < 0.5 * before
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").config.model_type == "polyattn"


def test_distill_cli_on_two_processes(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    save_tiny_llama(tmp_path / "llama", TEXT)
    assert cli_main(["convert", "--from", str(tmp_path / "llama"), "--out", str(tmp_path / "poly")]) == 0

    steps = 24
    output = accelerate_launch(
        tmp_path, "-m", "hf_polyattn.cli", "distill", "--teacher", "llama", "--student", "poly", "--data", "text.txt",
        "--out", "distilled", "--steps", str(steps), "--batch-size", "4", "--block", "32", "--lr", "3e-3",
        "--no-bf16",
    )
    assert_both_ranks_ran(output)
    state = json.loads((tmp_path / "distilled" / "checkpoints" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) >= 4 and sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    distilled = AutoModelForCausalLM.from_pretrained(tmp_path / "distilled")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "poly")
    assert any(not torch.equal(t, converted.state_dict()[n]) for n, t in distilled.state_dict().items())
