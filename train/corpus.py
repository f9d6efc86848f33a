"""The training corpus: the Python standard library's own source (PSF licence), by file.

The file list is fixed by rule (sorted relative paths, generated tables and tests left out) and
split by a hash of each path, so the held-out slice does not move when a file is added.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Tests are huge and repetitive; encodings/ and pydoc_data/ are generated tables and prose.
EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "encodings", "pydoc_data",
                 "__pycache__", "turtledemo"}
MAX_FILE_BYTES = 300_000
HELD_OUT_PERCENT = 5


@dataclass(frozen=True)
class SourceFile:
    name: str  # path relative to the stdlib root, "/"-separated
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def stdlib_files(root: Path | None = None) -> list[SourceFile]:
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        files.append(SourceFile(rel.as_posix(), text))
    return files


def split(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, held_out)."""
    return ([f for f in files if not is_held_out(f.name)],
            [f for f in files if is_held_out(f.name)])
