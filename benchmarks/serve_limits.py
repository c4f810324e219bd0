"""What `fflora serve`'s bounds cost and buy, on the embedded model (a script: the machine to itself).

For each tokens-per-step setting (`--max-batch-tokens`): how long a running stream stalls while a
3000-token prompt is prefilled beside it, how long that prompt waits for its token, and the
throughput of 30 concurrent streams; at the default setting also the resident memory next to the
estimate the server prints, and how quickly /health answers while a 20 MB request arrives.

    python benchmarks/serve_limits.py [--settings 256 512 1024 2048 8192] [--out results/serve-limits]

(results/serve-limits/ holds the run the default of `--max-batch-tokens` was chosen from.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx
import psutil

from fflora.serving.process import ServerProcess

BASE = "SmolLM2-135M-Instruct"


def stream_times(url: str, prompt, max_tokens: int, times: list, started: threading.Event | None = None) -> None:
    body = {"model": BASE, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                times.append(time.monotonic())
                if started is not None and len(times) == 30:
                    started.set()


def stall(url: str, long_tokens: int = 3000) -> dict:
    """A stream of 300 tokens; after its 30th, a `long_tokens` prompt arrives (one new token)."""
    times, started = [], threading.Event()
    runner = threading.Thread(target=stream_times, args=(url, "Tell me a story.", 300, times, started))
    runner.start()
    started.wait(600)
    ids = [1000 + (17 * i) % 30000 for i in range(long_tokens)]
    sent = time.monotonic()
    long_times: list = []
    stream_times(url, ids, 1, long_times)
    runner.join()
    gaps = [b - a for a, b in zip(times, times[1:])]
    before = gaps[5:28]
    return {"median_gap_s": statistics.median(before), "max_gap_s": max(gaps),
            "stretch_s": max(gaps) - statistics.median(before), "long_prompt_first_token_s": long_times[0] - sent}


def throughput(url: str, streams: int = 30, new_tokens: int = 64) -> dict:
    times = [[] for _ in range(streams)]
    threads = [threading.Thread(target=stream_times, args=(url, f"Question {i}: what is {i} + {i}?", new_tokens, t))
               for i, t in enumerate(times)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    tokens = sum(len(t) for t in times)
    return {"streams": streams, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


def big_body_health(url: str, megabytes: int = 20) -> dict:
    """/health latency, and a running stream's gaps, while a `megabytes` body is sent (declared and chunked)."""
    out = {}
    for kind in ("none", "content_length", "chunked"):  # "none": the stream's own jitter, for comparison
        times, started = [], threading.Event()
        runner = threading.Thread(target=stream_times, args=(url, "Tell me a story.", 120, times, started))
        runner.start()
        started.wait(600)
        payload = json.dumps({"model": BASE, "prompt": "x" * (megabytes << 20)}).encode()
        content = payload if kind == "content_length" else (payload[i:i + 65536] for i in range(0, len(payload), 65536))
        status = {}

        def send():
            if kind == "none":
                status["code"] = None
                return time.sleep(2)
            try:
                status["code"] = httpx.post(f"{url}/v1/completions", content=content, timeout=120,
                                            headers={"content-type": "application/json"}).status_code
            except httpx.HTTPError as e:  # the server may close the connection after its 413
                status["code"] = type(e).__name__

        sender = threading.Thread(target=send)
        sender.start()
        latencies = []
        while sender.is_alive() or len(latencies) < 5:
            t = time.monotonic()
            httpx.get(f"{url}/health", timeout=30)
            latencies.append(time.monotonic() - t)
            time.sleep(0.01)
        sender.join()
        runner.join()
        gaps = [b - a for a, b in zip(times, times[1:])]
        out[kind] = {"answer": status["code"], "health_max_s": max(latencies), "health_checks": len(latencies),
                     "stream_max_gap_over_median": max(gaps) / statistics.median(gaps)}
    return out


def memory(process: ServerProcess) -> dict:
    proc = psutil.Process(process.proc.pid)
    status = {line.split(":")[0]: int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
              if line.startswith(("VmHWM", "RssAnon", "RssFile"))}  # KiB
    printed = next((line for line in process.log_path.read_text().splitlines() if "memory: about" in line), None)
    return {"rss_gb": proc.memory_info().rss / 1e9, "peak_rss_gb": status["VmHWM"] * 1024 / 1e9,
            "anon_gb": status["RssAnon"] * 1024 / 1e9, "file_gb": status["RssFile"] * 1024 / 1e9, "estimate": printed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", type=int, nargs="+", default=[256, 512, 1024, 2048, 8192])
    parser.add_argument("--default", type=int, default=256, help="the setting to measure memory and big bodies at")
    parser.add_argument("--out", default="results/serve-limits")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"settings": {}, "machine": {"cpus": psutil.cpu_count()}}
    for tokens in args.settings:
        log = out / f"server-{tokens}.log"
        with ServerProcess(["--max-batch-tokens", str(tokens), "--log-level", "warning"], log) as server:
            stream_times(server.url, "warm up", 8, [])
            cell = {"stall": stall(server.url), "throughput_30": throughput(server.url)}
            if tokens == args.default:
                cell["memory"] = memory(server)
                cell["big_body"] = big_body_health(server.url)
            results["settings"][str(tokens)] = cell
            print(tokens, json.dumps(cell), flush=True)
        (out / "limits.json").write_text(json.dumps(results, indent=2) + "\n")
        log.unlink()


if __name__ == "__main__":
    main()
