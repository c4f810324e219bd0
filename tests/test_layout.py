"""The package's layering: module-level imports only, no import circle, and imports that only point down
(cli -> jobs -> bench -> recipes, serving -> methods -> fastpath -> models -> ops, utils)."""

import ast
import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fflora"
# Each top-level folder's layer: a module may import from its own layer or below, never above.
LAYERS = {"utils": 0, "ops": 0, "models": 1, "fastpath": 2, "methods": 3, "recipes": 4, "serving": 4, "bench": 5,
          "vllm": 4, "jobs": 6, "cli": 7, "": 8}
# Imports deferred on purpose, (module, what it imports): why.
DEFERRED = {("fflora.cli", "fflora.cli.commands"): "the commands load once the arguments are read: --help without torch"}
# Modules that need an optional dependency (an extra), and it: imported only where it is installed.
OPTIONAL = {"fflora.vllm.model": "vllm"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, bool]]:
    """(imported fflora module, at module level?) for every import statement of module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fflora"):
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("fflora")]
    return found


def _layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def test_every_import_is_at_module_level():
    nested = [f"{name} imports {target}" for name in MODULES for target, top in _imports(name)
              if not top and (name, target) not in DEFERRED]
    assert not nested, "function-local imports of fflora modules (move them to the top): " + "; ".join(nested)


def test_the_import_graph_has_no_circle():
    graph = {name: sorted({t for t, _ in _imports(name) if t != name}) for name in MODULES}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_imports_only_point_down_the_layers():
    upward = [f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
              for name in MODULES for target, _ in _imports(name) if _layer(target) > _layer(name)]
    assert not upward, "; ".join(upward)


def _folder(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and MODULES[name].name == "__init__.py") else ""


def test_two_folders_of_one_layer_import_each_other_one_way_at_most():
    """recipes/ and serving/ share a layer: the recipes evaluate on the serving engine, so serving/ must not
    reach back into recipes/ (what both need lives below, e.g. `methods.adapter_files.describe`)."""
    pairs = {(_folder(name), _folder(target)) for name in MODULES for target, _ in _imports(name)}
    both = sorted(f"{a}/ <-> {b}/" for a, b in pairs if a < b and a and b and (b, a) in pairs)
    assert not both, "folders that import each other: " + "; ".join(both)


def test_only_methods_know_which_method_a_model_holds():
    outside = [p for name, p in MODULES.items() if not name.startswith("fflora.methods")]
    offenders = [f"{p.relative_to(SRC)}: {needle}" for p in outside for needle in
                 ("is_zflora", "isinstance(config, ZFLoRAConfig)", "isinstance(config, FFBAConfig)")
                 if needle in p.read_text()]
    assert not offenders


# Outside `methods/`, where a method's name may still appear: the package's public face (`fflora.FFBAConfig`,
# ...), the torch-free list of the method folders and the default method.
NAMES_METHODS = {"fflora": "the public API names each method's configuration and tuner",
                 "fflora.utils.method_names": "finds the method folders; names the default method"}


def _method_names() -> set[str]:
    return {p.parent.name for p in (PACKAGE / "methods").glob("*/method.py")}


def test_no_module_outside_methods_lists_or_branches_on_methods():
    """A method is its folder: the CLI's choices, the recipes' and benches' method lists and kinds are
    derived from the registry (`utils.method_names`), so a new method touches no module outside its folder.
    Outside `methods/`, no literal tuple, list or set holds a method's name, no comparison or startswith
    tests a name against one, and no module imports a method folder's modules (`NAMES_METHODS` aside)."""
    names = _method_names()
    assert names >= {"ffba", "zflora"}

    def is_name(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    offenders = []
    for module, path in MODULES.items():
        if module.startswith("fflora.methods") or module in NAMES_METHODS:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.relative_to(SRC)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(map(is_name, node.elts)):
                offenders.append(f"{where}: a list of methods")
            elif isinstance(node, ast.Compare) and any(map(is_name, [node.left, *node.comparators])):
                offenders.append(f"{where}: a comparison with a method's name")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith"
                  and any(map(is_name, node.args))):
                offenders.append(f"{where}: startswith a method's name")
        offenders += [f"{path.relative_to(SRC)}: imports {target}" for target, _ in _imports(module)
                      if any(target.startswith(f"fflora.methods.{name}") for name in names)]
    assert not offenders, "; ".join(offenders)


# The study package, from its bottom up: a module imports only those before it (the aggregate reads
# records and never trains; the specification knows nothing of running).
STUDY_ORDER = ["spec", "schedule", "report", "runner"]


def test_the_study_package_imports_only_down_its_order():
    package = "fflora.recipes.study"
    assert sorted(STUDY_ORDER) == sorted(n.rpartition(".")[2] for n in MODULES if n.startswith(package + "."))
    upward = [f"{package}.{name} imports {target}" for i, name in enumerate(STUDY_ORDER)
              for target, _ in _imports(f"{package}.{name}")
              if target.startswith(package + ".") and target.rpartition(".")[2] not in STUDY_ORDER[:i]]
    assert not upward, "; ".join(upward)


def test_only_utils_classes_swaps_a_modules_class():
    """A module's class changes in one place (`fflora.utils.classes`: extend, restore), where each swap
    records the class it returns to; nowhere else assigns `__class__`."""
    swaps = [f"{p.relative_to(SRC)}:{node.lineno}" for name, p in MODULES.items() if name != "fflora.utils.classes"
             for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
             for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
             if isinstance(target, ast.Attribute) and target.attr == "__class__"]
    assert not swaps, "__class__ assigned outside fflora.utils.classes: " + ", ".join(swaps)


def test_every_module_imports_on_its_own_in_any_order():
    """Each module in a fresh interpreter, in a shuffled order (the seed is in the failure message)."""
    seed = random.randrange(2**32)
    order = sorted(name for name in MODULES if not name.endswith(".__main__")  # a script: it runs the command line
                   and (name not in OPTIONAL or importlib.util.find_spec(OPTIONAL[name])))
    random.Random(seed).shuffle(order)
    code = "import importlib\nfor name in %r:\n    importlib.import_module(name)\n" % order
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"seed {seed}: {run.stderr[-2000:]}"


def test_nothing_in_fflora_imports_its_vllm_plugin():
    """`fflora.vllm` is what vLLM loads (an optional extra): the package itself never depends on it."""
    users = [f"{name} imports {target}" for name in MODULES if not name.startswith("fflora.vllm")
             for target, _ in _imports(name) if target.startswith("fflora.vllm")]
    assert not users, "; ".join(users)


def test_the_command_line_and_import_fflora_load_no_torch():
    """`import fflora`, the parser and every command's --help answer without PyTorch, transformers or PEFT
    (what makes `fflora --help` take a tenth of a second, not six)."""
    code = """
import contextlib, io, sys
import fflora
from fflora.cli import build_parser
parser = build_parser()
commands = [["--help"], ["data", "prepare", "--help"], ["bench", "bank", "--help"], ["bench", "serve", "--help"],
            ["bench", "train", "--help"], ["bench", "formats", "--help"], ["export", "vllm", "--help"]]
commands += [[name, "--help"] for name in ("train", "eval", "bench", "study", "compare", "demo", "params", "verify",
                                           "generate", "serve")]
for argv in commands:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        parser.parse_args(argv)
    assert "usage: fflora" in out.getvalue(), argv
print(sorted(m for m in ("torch", "transformers", "peft", "numpy") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"

