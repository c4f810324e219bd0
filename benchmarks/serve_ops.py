"""`fflora serve` in operation, on the embedded model: what a /metrics scrape costs while 30 streams run,
and a shutdown with long streams running (exit status, time, what each client got).

    python benchmarks/serve_ops.py [--shutdown-timeout 5] [--out results/serve-ops]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import httpx

from fflora.serving.process import ServerProcess

BASE = "SmolLM2-135M-Instruct"


def stream(url: str, max_tokens: int, lines: list) -> None:
    body = {"model": BASE, "prompt": "Tell me a long story.", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
            lines.extend(line for line in response.iter_lines() if line.startswith("data: "))
    except httpx.HTTPError as e:
        lines.append(f"transport error: {type(e).__name__}")


def scrape_cost(url: str, streams: int = 30) -> dict:
    outputs = [[] for _ in range(streams)]
    threads = [threading.Thread(target=stream, args=(url, 64, out)) for out in outputs]
    for t in threads:
        t.start()
    while httpx.get(f"{url}/health", timeout=10).json()["running_requests"] < streams:
        time.sleep(0.05)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        httpx.get(f"{url}/metrics", timeout=10)
        times.append(time.perf_counter() - start)
    health = []
    for _ in range(50):
        start = time.perf_counter()
        httpx.get(f"{url}/health", timeout=10)
        health.append(time.perf_counter() - start)
    for t in threads:
        t.join()
    return {"streams": streams, "metrics_median_s": statistics.median(times), "health_median_s": statistics.median(health),
            "note": "HTTP round trips from a client on the same 2 cores; /health is the same round trip doing nothing"}


def shutdown(args: list[str], log: Path, timeout_s: float, streams: int = 4, max_tokens: int = 1500) -> dict:
    server = ServerProcess([*args, "--shutdown-timeout", str(timeout_s)], log).start()
    outputs = [[] for _ in range(streams)]
    threads = [threading.Thread(target=stream, args=(server.url, max_tokens, out)) for out in outputs]
    for t in threads:
        t.start()
    while httpx.get(f"{server.url}/health", timeout=10).json()["running_requests"] < streams:
        time.sleep(0.05)
    time.sleep(2)
    start = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)
    code = server.proc.wait(timeout=timeout_s + 60)
    elapsed = time.monotonic() - start
    for t in threads:
        t.join()
    clients = [{"events": len(out), "last": out[-1] if out else None,
                "error_before_done": len(out) > 1 and out[-1] == "data: [DONE]" and '"error"' in out[-2]} for out in outputs]
    return {"shutdown_timeout_s": timeout_s, "exit_status": code, "seconds_to_exit": elapsed, "clients": clients}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shutdown-timeout", type=float, default=5.0)
    parser.add_argument("--out", default="results/serve-ops")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    with ServerProcess(["--log-level", "warning"], out / "server.log") as server:
        result["scrape_at_30_streams"] = scrape_cost(server.url)
    result["shutdown"] = shutdown(["--log-level", "warning"], out / "server.log", args.shutdown_timeout)
    (out / "server.log").unlink()
    (out / "ops.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
