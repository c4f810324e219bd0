"""FFBA inside vLLM against vLLM's base model and vLLM's LoRA, with `fflora serve` beside them.

    make test-vllm        # once: vLLM's CPU build in .venv-vllm
    python benchmarks/vllm_serve.py --adapter runs/ffba --out results/vllm-serve   # the CPU to itself

Four servers per dtype, all started first (vLLM as its users start it: its OpenAI server, compiled, on
127.0.0.1): the base model; the FFBA adapter exported with `fflora export vllm`; the base model with
`--enable-lora` and 8 random LoRA adapters at the FFBA adapter's parameter budget (request i on adapter
i mod 8); and `fflora serve` with the FFBA adapter. Then `--rounds` rounds, each measuring every server
in turn (the order rotated each round; the others idle), so the ratios come from interleaved
measurements; the table gives each level's median over the rounds. Load: the openai client, 1 / 4 / 8
concurrent streams, each sending `--requests-per-stream` completions of a 64-token prompt (token ids)
for 64 new tokens (greedy, ignore_eos); output tokens per second over the wall time of a level.
Writes vllm-serve.json and vllm-serve.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
from openai import OpenAI
from peft import LoraConfig, get_peft_model

import fflora
from fflora.models.base_models import default_model_dir
from fflora.recipes.budget import LORA_TARGETS
from fflora.recipes.export_vllm import export_vllm
from fflora.serving.process import ServerProcess

TEXT = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the field near the "
        "river, and the children play with a red ball under the old oak tree on a sunny afternoon in June. ") * 3


def lora_adapters(folder: Path, rank: int, count: int) -> list[Path]:
    """`count` random LoRA adapters of rank `rank` on all seven projections, saved by PEFT."""
    paths = []
    for i in range(count):
        model = get_peft_model(fflora.load_base_model()[0], LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                       target_modules=LORA_TARGETS))
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data.normal_(0, 0.02)
        model.save_pretrained(folder / f"lora{i}")
        paths.append(folder / f"lora{i}")
    return paths


def measure(url: str, models: list[str], prompt: list[int], streams: int, per_stream: int, new_tokens: int) -> dict:
    """Output tokens/s of `streams` clients, each sending `per_stream` requests one after another."""
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)

    def stream(k: int) -> int:
        tokens = 0
        for j in range(per_stream):
            out = client.completions.create(model=models[(k * per_stream + j) % len(models)], prompt=prompt,
                                            max_tokens=new_tokens, temperature=0, extra_body={"ignore_eos": True})
            tokens += out.usage.completion_tokens
        return tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        tokens = sum(pool.map(stream, range(streams)))
    wall = time.perf_counter() - start
    return {"streams": streams, "requests": streams * per_stream, "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", required=True, help="an FFBA adapter (or run folder) on the embedded SmolLM2")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    parser.add_argument("--out", default="results/vllm-serve")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vllm-serve-"))
    base = default_model_dir()
    exported = export_vllm(args.adapter, work / "ffba")
    loras = lora_adapters(work, args.lora_rank, 8)
    tokenizer = fflora.load_base_model()[1]
    prompt = tokenizer(TEXT)["input_ids"][:64]
    vllm = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server"]
    common = ["--served-model-name", "base", "--max-model-len", "512", "--gpu-memory-utilization", "0.1"]
    servers = {
        "vllm base": (vllm, ["--model", str(base), *common], ["base"]),
        "vllm ffba": (vllm, ["--model", str(exported), *common], ["base"]),
        "vllm lora x8": (vllm, ["--model", str(base), *common, "--enable-lora", "--max-loras", "8",
                                "--max-lora-rank", str(args.lora_rank), "--lora-modules",
                                *[f"l{i}={p}" for i, p in enumerate(loras)]], [f"l{i}" for i in range(8)]),
        "fflora serve ffba": (None, ["--adapter", f"ffba={Path(args.adapter).resolve()}"], ["ffba"]),
    }
    result = {"adapter": str(args.adapter), "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
              "requests_per_stream": args.requests_per_stream, "rounds": args.rounds, "lora_rank": args.lora_rank,
              "runs": {}}
    for dtype in args.dtypes:
        with ExitStack() as stack:
            started = {}
            for name, (program, server_args, models) in servers.items():  # one at a time: each starts alone
                log = out / f"{name.replace(' ', '-')}-{dtype}.log"
                start = time.perf_counter()
                server = stack.enter_context(ServerProcess([*server_args, "--dtype", dtype], log, program=program,
                                                           ready_timeout_s=900))
                started[name] = (server, models, time.perf_counter() - start)
                measure(server.url, models, prompt, 1, 1, 8)  # warm-up
                print(name, dtype, f"ready in {started[name][2]:.0f} s", flush=True)
            rounds = {name: [] for name in started}
            for r in range(args.rounds):
                names = list(started)[r % len(started):] + list(started)[: r % len(started)]
                for name in names:
                    server, models, _ = started[name]
                    rounds[name].append([measure(server.url, models, prompt, s, args.requests_per_stream,
                                                 args.new_tokens) for s in args.streams])
                    print(f"round {r + 1}", name, dtype, [round(x["tokens_per_s"], 1) for x in rounds[name][-1]],
                          flush=True)
            for name, (server, _, ready_s) in started.items():
                httpx.get(f"{server.url}/health")
                levels = [{"streams": s, "tokens_per_s": statistics.median(rnd[i]["tokens_per_s"] for rnd in rounds[name]),
                           "rounds": [rnd[i] for rnd in rounds[name]]} for i, s in enumerate(args.streams)]
                result["runs"][f"{name} {dtype}"] = {"server": name, "dtype": dtype, "start_s": ready_s,
                                                     "levels": levels}
        for name in servers:
            (out / f"{name.replace(' ', '-')}-{dtype}.log").unlink(missing_ok=True)
    (out / "vllm-serve.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "vllm-serve.md").write_text(format_table(result) + "\n")
    print(format_table(result))


def format_table(result: dict) -> str:
    runs = result["runs"]
    streams = [level["streams"] for level in next(iter(runs.values()))["levels"]]
    lines = [f"Output tokens/s (prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new, greedy; "
             f"{result['requests_per_stream']} requests per stream; median of {result.get('rounds', 1)} interleaved "
             "rounds):", "",
             "| server | dtype | start s | " + " | ".join(f"{s} streams" for s in streams) + " |",
             "|---|---|---:|" + "---:|" * len(streams)]
    for run in runs.values():
        lines.append(f"| {run['server']} | {run['dtype']} | {run['start_s']:.0f} | "
                     + " | ".join(f"{level['tokens_per_s']:.1f}" for level in run["levels"]) + " |")
    lines += ["", "| ratio | dtype | " + " | ".join(f"{s} streams" for s in streams) + " |",
              "|---|---|" + "---:|" * len(streams)]
    for dtype in sorted({r["dtype"] for r in runs.values()}):
        for a, b in (("vllm ffba", "vllm base"), ("vllm ffba", "vllm lora x8"), ("vllm ffba", "fflora serve ffba")):
            if f"{a} {dtype}" in runs and f"{b} {dtype}" in runs:
                pairs = zip(runs[f"{a} {dtype}"]["levels"], runs[f"{b} {dtype}"]["levels"])
                lines.append(f"| {a} / {b} | {dtype} | "
                             + " | ".join(f"{x['tokens_per_s'] / y['tokens_per_s']:.2f}" for x, y in pairs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
