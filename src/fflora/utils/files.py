"""Atomic file writes (a reader sees the old file or the new one, never half of one), and JSON Lines
read as JSON Lines."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file next to `target`, then rename it over `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | os.PathLike, payload: bytes) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(payload))


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_text(text))


def json_lines(text: str) -> list[str]:
    """The lines of a JSON Lines text: split at "\\n" only. str.splitlines() also splits at U+2028,
    U+0085 and other characters that a JSON string may hold unescaped (GSM8K's training set has one)."""
    return text.split("\n")


def parse_jsonl(text: str) -> list:
    """The records of a JSON Lines text (blank lines skipped)."""
    return [json.loads(line) for line in json_lines(text) if line.strip()]


def read_jsonl(path: str | os.PathLike) -> list:
    """The records of a JSON Lines file (UTF-8)."""
    return parse_jsonl(Path(path).read_text(encoding="utf-8"))
