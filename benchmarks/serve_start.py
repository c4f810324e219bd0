"""How long `fflora serve` takes from its start to the first token it serves, eager and compiled (issue 43).

Each start runs `fflora serve` on the embedded SmolLM2-135M with 8 random FFBA r = 8 adapters, waits
for /health, then sends one streamed request (16 prompt tokens, 8 new tokens, greedy, adapter a0): the
time from launching the process to that request's first token is what a client waiting on a fresh
server sees. The server's own line ("engine ready ... warm-up steps: X s") splits it. Order: eager,
compiled with an empty inductor cache (cold: the decode graph compiled from scratch), compiled
again on the cache the cold start left (warm: Dynamo traces, inductor's compiled code comes from disk),
eager again. Run it with the CPU to itself:

    python benchmarks/serve_start.py --out results/serve-start
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import tempfile
import time
from pathlib import Path

import httpx

import fflora
from fflora.bench.serve import Request, _one, make_adapters
from fflora.serving.process import ServerProcess


def start_to_first_token(args: list[str], log: Path) -> dict:
    """Seconds from launching the server to /health answering and to the first token of one request."""
    launched = time.perf_counter()
    with ServerProcess(args, log, ready_timeout_s=1800) as server:
        healthy = time.perf_counter() - launched

        async def ask() -> dict:
            async with httpx.AsyncClient(timeout=600) as client:
                return await _one(client, server.url, "a0", Request(0.0, 0, list(range(100, 116)), 8), time.perf_counter())

        answer = asyncio.run(ask())
        first = healthy + answer["ttft"]
    ready = re.search(r"engine ready ([\d.]+) s after start .*warm-up steps: ([\d.]+) s", log.read_text())
    return {"health_s": round(healthy, 1), "first_token_s": round(first, 1),
            "engine_ready_s": float(ready[1]) if ready else None, "warm_up_s": float(ready[2]) if ready else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/serve-start"))
    parser.add_argument("--max-num-seqs", type=int, default=8)
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    base, _ = fflora.load_base_model()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(base, Path(tmp), 8, 8, 0)
        del base
        common = ["--max-adapters", "8", "--max-num-seqs", str(opts.max_num_seqs), "--log-level", "warning",
                  *(a for i, p in enumerate(paths) for a in ("--adapter", f"a{i}={p}"))]
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # empty: the first compiled start is cold
        runs = []
        for name, extra in (("eager", []), ("compiled, cold cache", ["--compile"]),
                            ("compiled, warm cache", ["--compile"]), ("eager, again", [])):
            print(f"[serve-start] {name} ...", flush=True)
            runs.append({"start": name, **start_to_first_token([*common, *extra], opts.out / "server.log")})
            print(f"[serve-start] {runs[-1]}", flush=True)
    (opts.out / "server.log").unlink(missing_ok=True)
    result = {"model": "embedded SmolLM2-135M-Instruct", "adapters": 8, "max_num_seqs": opts.max_num_seqs,
              "command": "python benchmarks/serve_start.py", "runs": runs}
    (opts.out / "serve-start.json").write_text(json.dumps(result, indent=2))
    lines = ["| start | /health (s) | first token (s) | engine ready (s) | warm-up steps (s) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['start']} | {r['health_s']} | {r['first_token_s']} | {r['engine_ready_s']} | {r['warm_up_s']} |"
              for r in runs]
    (opts.out / "serve-start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
