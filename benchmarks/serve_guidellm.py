"""A standard load client against `fflora serve`: GuideLLM, driving the server unchanged.

GuideLLM pulls an unpinned torch, so it lives in a venv of its own, pinned to the same CPU wheel:

    python3 -m venv .guidellm && echo torch==2.13.0 > /tmp/pin && .guidellm/bin/pip install -c /tmp/pin guidellm
    python benchmarks/serve_guidellm.py --guidellm .guidellm/bin/guidellm [--out results/serve-guidellm]

The load is `fflora bench serve`'s uniform cell for one model: Poisson arrivals at 2 requests/s, 24
requests, prompts of 80 tokens and outputs of 40 (the means of bench serve's 32-128 and 16-64), on the
base model; the tokenizer is the embedded model's local folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from fflora.models.base_models import default_model_dir
from fflora.serving.process import ServerProcess

BASE = "SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--guidellm", required=True, help="the guidellm executable")
    parser.add_argument("--out", default="results/serve-guidellm")
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--requests", type=int, default=24)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with ServerProcess(["--log-level", "warning"], out / "server.log") as server:
        command = [args.guidellm, "run",
                   "--backend", f"kind=openai_http,target={server.url},model={BASE},request_format=/v1/completions",
                   "--profile", f"kind=poisson,rate={args.rate}",
                   "--constraint", f"kind=max_requests,count={args.requests}",
                   "--tokenizer", f"kind=huggingface_auto,model={default_model_dir()}",
                   "--data", "kind=synthetic_text,prompt_tokens=80,output_tokens=40",
                   "--output", f"kind=json,path={out / 'guidellm.json'}",
                   "--disable-console-interactive"]
        (out / "command.txt").write_text(" ".join(command) + "\n")
        run = subprocess.run(command, capture_output=True, text=True)
        (out / "guidellm.log").write_text(run.stdout + run.stderr)
    (out / "server.log").unlink()
    print(run.stdout[-6000:], run.stderr[-3000:])
    print(json.dumps({"returncode": run.returncode, "out": str(out)}))


if __name__ == "__main__":
    main()
