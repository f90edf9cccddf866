"""What every benchmark does with its results: name the command that made them, write, print."""

import shlex
import sys
from pathlib import Path


def command_line(script: str, argv: list[str] | None) -> str:
    """`python benchmarks/<script> <arguments>`: the command that reproduces this run."""
    arguments = argv if argv is not None else sys.argv[1:]
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *arguments])


def write_results(path: Path, text: str) -> None:
    """Write the Markdown results (creating their folder) and print them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)


def plot_secure_steps(steps: list[float], prompt_len: int, latency, path: Path, predicted: dict[int, float] | None = None) -> None:
    """Seconds per encrypted step by position (prompt gray, generated blue; `predicted`: the
    planner's seconds at 1-based positions) beside the per-operation breakdown, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    positions = range(1, len(steps) + 1)
    left.bar(positions, steps, color=["tab:gray" if i <= prompt_len else "tab:blue" for i in positions], label="measured")
    if predicted:
        far = sorted(predicted)
        left.plot(far, [predicted[t] for t in far], "o--", color="tab:red", label="predicted")
        left.legend()
    left.set_xlabel("position T (gray: prompt, blue: generated)")
    left.set_ylabel("seconds per encrypted step")
    left.set_title("seconds per token as the encrypted KV cache grows")
    kinds = sorted(latency.seconds, key=latency.seconds.get)
    right.barh(kinds, [latency.seconds[k] for k in kinds], color="tab:orange")
    right.set_xlabel("seconds (whole generation)")
    right.set_title("per-operation breakdown")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
