"""The `fflora` command line: data, training, evaluation, fusing, benchmarks, generation and serving.

`parser` declares the commands and their options without importing PyTorch; `commands` runs them.
`main` reads the arguments first, so `--help`, `--version` and a mistyped flag answer at once.
"""

from __future__ import annotations

import os
import sys
import warnings

from ..models.catalog import check_model
from ..utils.errors import FFloraError
from .parser import build_parser

# The packages of the `serve` and `cli` extras (pyproject.toml), by their import names.
EXTRA_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus-client": "prometheus_client", "httpx": "httpx",
                 "datasets": "datasets", "rouge-score": "rouge_score", "matplotlib": "matplotlib"}


def _cli_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line for a command-line user: what happened, not the Python source that said
    it; fflora's own say so, a library's keep their category."""
    ours = f"{os.sep}fflora{os.sep}" in str(filename)
    return f"fflora: warning: {message}\n" if ours else f"{category.__name__}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _cli_warning
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "check"):  # the command's settings, checked before its modules load
            args.check(args)
        check_model(getattr(args, "model", None))  # a --model that names nothing loadable fails now
        try:
            from . import commands  # here, not above: PyTorch and the rest load only for a command that runs
        except ModuleNotFoundError as e:
            if (e.name or "").partition(".")[0] not in EXTRA_MODULES.values():
                raise
            raise FFloraError(f"{e.name} is not installed: the command line needs its extra, "
                              "pip install 'fflora[cli]'") from e
        getattr(commands, args.handler)(args)
    except (ValueError, FileNotFoundError, FFloraError) as e:
        print(f"fflora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; the shell's status for SIGINT
        print("fflora: interrupted", file=sys.stderr)
        return 130
    return 0
