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
