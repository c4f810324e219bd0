"""`pip install fflora` gives the PEFT methods and the fused form without the extras (`serve`, `cli`);
the command line without them says which extra to install."""

import subprocess
import sys
import tomllib
from pathlib import Path

from fflora.cli import EXTRA_MODULES

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
BLOCK = "import sys\nfor name in %r:\n    sys.modules[name] = None  # as if not installed\n" % sorted(EXTRA_MODULES.values())


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=300)


def test_the_extras_are_what_the_core_leaves_out():
    core = {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    named = {d for group in ("serve", "cli") for d in extras[group] if not d.startswith("fflora[")}
    assert named == set(EXTRA_MODULES) and not core & named


def test_the_methods_and_the_fused_form_work_without_the_extras():
    code = """
import torch
from transformers import LlamaConfig, AutoModelForCausalLM
import peft
import fflora
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = AutoModelForCausalLM.from_config(config)
peft_model = peft.get_peft_model(model, fflora.FFBAConfig(r=4))
ids = torch.randint(0, 64, (1, 8))
fused = peft_model.merge_and_unload()
fflora.plan_gemms(fused, "standard")
print(tuple(fused(ids).logits.shape), fflora.list_adapters(fflora.fuse(AutoModelForCausalLM.from_config(config),
                                                                      max_adapters=2)))
"""
    run = _run(code)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[-2] == "(1, 8, 64) []"


def test_the_command_line_without_its_extra_names_it():
    run = _run("from fflora.cli import main\nprint(main(['params']))")
    assert run.stdout.strip() == "2"
    assert "is not installed: the command line needs its extra, pip install 'fflora[cli]'" in run.stderr
