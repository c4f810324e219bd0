"""The README's Python blocks run as written, in order, in one namespace (as a reader pastes them),
on the tiny test model instead of the embedded one, in a folder holding the adapters they name.
A block preceded by `<!-- not run: REASON -->` is skipped, its reason stated there."""

import re
from pathlib import Path

import pytest
from conftest import randomize_adapters

import fflora

README = Path(__file__).resolve().parents[1] / "README.md"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block not marked `<!-- not run: ... -->`."""
    blocks = []
    for match in re.finditer(r"(<!-- not run: [^>]+ -->\n)?```python\n(.*?)```", text, re.S):
        if not match.group(1):
            blocks.append((text[: match.start(2)].count("\n") + 1, match.group(2)))
    return blocks


def test_every_skipped_block_says_why():
    text = README.read_text()
    assert len(python_blocks(text)) >= 4
    assert text.count("```python") == len(python_blocks(text)) + text.count("<!-- not run: ")


@pytest.mark.filterwarnings("ignore")
def test_the_readme_python_blocks_run_as_written(tiny_model_dir, tmp_path, monkeypatch):
    real = fflora.load_base_model

    def load_base_model(name_or_path=None, **kwargs):  # the embedded model's stand-in: tiny, with a chat template
        model, tokenizer = real(tiny_model_dir, **kwargs)
        tokenizer.chat_template = CHAT_TEMPLATE
        return model, tokenizer

    monkeypatch.chdir(tmp_path)
    for name in ("math", "chat", "code"):  # the adapter folders the bank's blocks load
        model = fflora.apply_ffba(load_base_model()[0], fflora.FFBAConfig(r=2))
        randomize_adapters(model)
        fflora.save_adapter(model, tmp_path / "runs" / name / "adapter")
    monkeypatch.setattr(fflora, "load_base_model", load_base_model)
    namespace: dict = {}
    for line, code in python_blocks(README.read_text()):
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the README's block at line {line} failed: {type(e).__name__}: {e}") from e
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "ffba" / "adapter_config.json").is_file()
