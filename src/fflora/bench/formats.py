"""fflora's fused weight formats side by side, and the peers a user would run instead, at their best.

For each format (`fflora.fuse(model, weights=...)`): the fused base, FFBA fused (a trained adapter given as
`adapter`, or a random one of rank `rank`), zFLoRA fused (random) and the adapter bank with 8 random
FFBA adapters resident (row i of a batch uses adapter i mod 8: at batch 8, eight distinct adapters),
each planned (`fflora.plan_gemms`, "auto": the float GEMMs' layouts measured for the batch size) and
compiled (`fflora.compile_decode`) for each batch size: fflora at its best, as the peers are at theirs.
Beside them the peers (issue 32): the stock transformers model and PEFT's unmerged LoRA (the rank whose
trainable budget matches FFBA's), compiled as transformers compiles them
(`compile_generation`: static cache, the same inductor settings), in float32 and bfloat16 (they have no
int8 / int4 CPU decode); and llama.cpp (`bench.llama_cpp`, optional) on the GGUF the model comes from,
converted to the file type nearest each format (F32, F16, Q8_0, Q4_1), at batch 1. Everything is timed
interleaved in one process (TTFT, TPOT: medians of `repeats` rounds). Bytes per token are the weights one
decode step reads (every GEMM and the LM head; the embedding table only where the head is it); GB/s is that
over TPOT, next to the read bandwidth of a large tensor measured in the same run. Quality: teacher-forced
next-token agreement on a fixed English text with the float32 model of the same kind (the stock float32
model for the base kinds and llama.cpp), and with a trained adapter its dev loss (the held-out records of
`dev_task`, in `dev_form`) in every format.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib
import torch
from torch import nn

from ..fastpath.compile import compile_generation
from ..methods import FFBAConfig, FusedModel, compile_decode, fuse, load_adapter, plan_gemms, select_adapters
from ..models.base_models import embedded_gguf
from ..models.catalog import embedded
from ..models.footprint import tensor_bytes
from ..ops.formats import WEIGHT_FORMATS
from ..recipes.budget import match_lora_rank
from ..recipes.evaluate import response_loss
from ..recipes.train import dev_records
from ..utils.sources import say
from . import llama_cpp
from .bank import ffba_states
from .latency import _adapted, _lora, _median_spread, _randomize, time_generation, write_results
from .settings import FFLORA_KINDS, PEER_KINDS, FormatsBenchSettings

BANK_ADAPTERS = 8  # of bank_fused: rank-`rank` FFBA adapters resident, row i of a batch uses adapter i mod 8
PEER_FORMATS = ("float32", "bfloat16")  # the formats stock transformers and PEFT decode on a CPU
BASE_KINDS = ("fused_base", "base_compiled", "llama_cpp")  # compared with the stock float32 model
DEV_LOSS_KINDS = ("fused_base", "ffba_fused")  # with a trained FFBA adapter
# Targets, "a / b" <= limit on median TPOT (issues 31 and 32), checked per batch size where both were measured.
RATIO_TARGETS = (("int8/fused_base", "float32/fused_base", 0.50), ("int4/fused_base", "float32/fused_base", 0.35),
                 *((f"{w}/ffba_fused", f"{w}/fused_base", 1.03) for w in WEIGHT_FORMATS),
                 *((f"{w}/bank_fused", f"{w}/fused_base", 1.10) for w in WEIGHT_FORMATS),
                 *((f"{w}/ffba_fused", f"{w}/lora_unmerged_compiled", 0.80) for w in PEER_FORMATS),
                 *((f"{w}/ffba_fused", f"{w}/llama_cpp", 1.00 if w == "int4" else 1.25) for w in WEIGHT_FORMATS))
AGREEMENT_TARGETS = {"bfloat16": 0.97, "int8": 0.95, "int4": 0.90}  # of the base and FFBA kinds
TEXT = ("The river ran high that spring, and the mill at the bend of the valley worked from dawn until the "
        "lamps were lit. Farmers brought their grain in carts, and the miller, a patient man with flour in his "
        "beard, weighed every sack twice. Children watched the great wheel turn and counted the buckets as they "
        "rose dripping from the water. In the evenings the village gathered at the inn to talk of the harvest, "
        "of the prices in the market town, and of the letters that came, now and then, from those who had gone "
        "to the cities in the north. ") * 3



def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a decode step reads: everything but the embedding table (one row per token),
    unless the LM head is the table."""
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    table_tensors = _own(table)
    tied = head is not None and {t.data_ptr() for t in _own(head)} & {t.data_ptr() for t in table_tensors}
    return tensor_bytes(model, leave_out=() if tied else table_tensors)


def _own(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


@torch.no_grad()
def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of summing a large float32 tensor (the read side only)."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def agreement(argmax: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of positions where two next-token argmaxes agree."""
    return (argmax == reference).float().mean().item()


def build_model(base: nn.Module, weights: str, kind: str, settings: FormatsBenchSettings, lora_rank: int) -> nn.Module:
    """A deep copy of `base` as `kind` in `weights` (a peer's weights cast to that dtype)."""
    if kind == "bank_fused":
        config = FFBAConfig(r=settings.rank, alpha=2 * settings.rank)
        fused = FusedModel.build(copy.deepcopy(base), max_adapters=BANK_ADAPTERS, rank_budget=BANK_ADAPTERS * settings.rank,
                                 weights=weights)
        for k, state in enumerate(ffba_states(base, config, BANK_ADAPTERS, settings.seed)):
            fused.add(f"ffba{k}", config, state)
        return fused.model.eval()
    model = copy.deepcopy(base)
    if kind in PEER_KINDS:
        if kind == "lora_unmerged_compiled":
            lora = _lora(model, lora_rank)
            _randomize(lora, settings.seed)
            model = lora.get_base_model()  # the transformers model with PEFT's layers inside: what generate compiles
        return model.to(getattr(torch, weights)).eval()
    if kind == "ffba_fused" and settings.adapter:
        load_adapter(model, settings.adapter, strict=True)
    elif kind != "fused_base":
        _randomize(_adapted(model, kind.removesuffix("_fused"), settings.rank), settings.seed)
    return fuse(model, weights=weights).eval()


def rows_of(key: str, model: nn.Module, batch: int):
    """The context the model of `key` ("format/kind") runs `batch` rows in: a bank's rows name their adapters."""
    if not key.endswith("/bank_fused"):
        return contextlib.nullcontext()
    return select_adapters(model, [f"ffba{i % BANK_ADAPTERS}" for i in range(batch)])


def llama_cpp_peers(settings: FormatsBenchSettings, model_name: str | None, n_ctx: int) -> tuple[dict, dict]:
    """({format: LlamaCpp} for the file type nearest each format, a report of what ran or why nothing did)."""
    reason = "turned off (--no-llama-cpp)" if not settings.llama_cpp else llama_cpp.available()
    spec = embedded(model_name) if model_name else None
    if not reason and not settings.gguf and spec is None:
        reason = f"no GGUF file of {model_name} (only the embedded models have one here: pass --gguf)"
    if reason:
        say(f"llama.cpp rows left out: {reason}")
        return {}, {"skipped": reason}
    source, extra = Path(settings.gguf) if settings.gguf else embedded_gguf(spec), llama_cpp.extra_buffers_work()
    source_type = llama_cpp.file_type(source)
    peers, files = {}, {}
    for weights in settings.formats:
        wanted = llama_cpp.NEAREST[weights]
        path = source if wanted == source_type else llama_cpp.converted(source, wanted)
        peers[weights] = llama_cpp.LlamaCpp(path, torch.get_num_threads(), n_ctx, extra_buffers=extra)
        files[weights] = {"type": wanted, "file": path.name, "weight_bytes": llama_cpp.weight_bytes(path)}
    return peers, {"skipped": None, "source": source.name, "source_type": source_type, "files": files,
                   "extra_buffers": extra, "batch_sizes": [1]}


def run_formats_bench(base: nn.Module, tokenizer, settings: FormatsBenchSettings) -> dict:
    """Every (format, kind) model and llama.cpp peer, timed per batch size; `base` stays untouched."""
    lora_rank = settings.lora_rank or match_lora_rank(base.config, FFBAConfig(r=settings.rank))
    models = {}
    for weights in settings.formats:
        for kind in settings.kinds:
            if kind in FFLORA_KINDS or weights in PEER_FORMATS:
                say(f"building {weights} {kind}")
                models[f"{weights}/{kind}"] = build_model(base, weights, kind, settings, lora_rank)
    text_ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :512]
    n_ctx = settings.prompt_len + settings.new_tokens
    peers, llama_report = llama_cpp_peers(settings, getattr(base.config, "_name_or_path", None), n_ctx)
    argmax = {}  # each model's teacher-forced next tokens on the text, once
    with torch.no_grad():
        stock = base(text_ids).logits.argmax(-1)
        for key, model in models.items():
            with rows_of(key, model, 1):
                argmax[key] = model(text_ids).logits.argmax(-1)
    quality = {}
    for key, found in argmax.items():
        kind = key.split("/")[1]
        quality[key] = agreement(found, stock if kind in BASE_KINDS else argmax[f"float32/{kind}"])
    for weights, peer in peers.items():
        found = llama_cpp.teacher_forced_argmax(peer.path, text_ids[0].tolist(), torch.get_num_threads(),
                                                llama_report["extra_buffers"])
        quality[f"{weights}/llama_cpp"] = agreement(torch.from_numpy(found), stock[0])
    dev_loss = {}
    if settings.adapter:
        records = dev_records(settings.dev_task, settings.dev_size, settings.data_dir)
        for key, model in models.items():
            if key.split("/")[1] in DEV_LOSS_KINDS:
                say(f"dev loss of {key}")
                dev_loss[key] = response_loss(model, tokenizer, records, form=settings.dev_form)
    latency, compile_s = {}, {}
    vocab = base.config.get_text_config().vocab_size
    for batch in settings.batch_sizes:
        ids = torch.randint(10, vocab, (batch, settings.prompt_len), generator=torch.Generator().manual_seed(settings.seed))
        for key, model in models.items():
            if key.split("/")[1] in FFLORA_KINDS:
                plan_gemms(model, settings.gemm_plan, rows=(batch,))
        if settings.compile:
            for key, model in models.items():
                say(f"compiling {key} for batch {batch}")
                start = time.perf_counter()
                compile_ = compile_generation if key.split("/")[1] in PEER_KINDS else compile_decode
                compile_(model, cpp_wrapper=settings.cpp_wrapper)
                with rows_of(key, model, batch):
                    time_generation(model, ids, settings.new_tokens)
                compile_s[f"{key}/{batch}"] = time.perf_counter() - start
        runs = {key: functools.partial(_timed, key, model, ids, settings.new_tokens) for key, model in models.items()}
        if batch == 1:
            runs.update({f"{w}/llama_cpp": functools.partial(peer.time_generation, ids[0].tolist(), settings.new_tokens)
                         for w, peer in peers.items()})
        samples = {key: {"ttft": [], "tpot": []} for key in runs}
        for round_ in range(settings.warmup + settings.repeats):
            say(f"formats batch {batch}: round {round_ + 1}/{settings.warmup + settings.repeats}")
            for key, run in runs.items():
                ttft, tpot = run()
                if round_ >= settings.warmup:
                    samples[key]["ttft"].append(ttft)
                    samples[key]["tpot"].append(tpot)
        latency[str(batch)] = {key: {m: _median_spread(v) for m, v in s.items()} for key, s in samples.items()}
    for peer in peers.values():
        peer.close()
    weight_counts = {key: weight_bytes(m) for key, m in models.items()}
    weight_counts.update({f"{w}/llama_cpp": f["weight_bytes"] for w, f in llama_report.get("files", {}).items()})
    result = {"model": getattr(base.config, "_name_or_path", None), "settings": asdict(settings),
              "lora_rank": lora_rank, "threads": torch.get_num_threads(), "read_bandwidth_gb_s": read_bandwidth(),
              "weight_bytes": weight_counts, "agreement": quality, "dev_loss": dev_loss, "latency": latency,
              "compile_s": compile_s, "llama_cpp": llama_report}
    result["targets"] = check_targets(result)
    return result


def _timed(key: str, model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    with rows_of(key, model, ids.shape[0]):
        return time_generation(model, ids, new_tokens)


def check_targets(result: dict) -> dict:
    """Each target whose operands were measured: the TPOT ratios per batch size ("a / b @ batch"), and the
    agreement floors ("key agreement") -> value, limit, met."""
    targets = {}
    for batch, cells in result["latency"].items():
        tpot = {key: cell["tpot"]["median"] for key, cell in cells.items()}
        for a, b, limit in RATIO_TARGETS:
            if a in tpot and b in tpot:
                ratio = tpot[a] / tpot[b]
                targets[f"{a} / {b} @ batch {batch}"] = {"value": ratio, "limit": limit, "met": ratio <= limit}
    for key, value in result["agreement"].items():
        weights, kind = key.split("/")
        if weights in AGREEMENT_TARGETS and kind in ("fused_base", "ffba_fused"):
            floor = AGREEMENT_TARGETS[weights]
            targets[f"{key} agreement"] = {"value": value, "limit": floor, "met": value >= floor}
    return targets


def format_formats_table(result: dict) -> str:
    bw = result["read_bandwidth_gb_s"]
    has_loss = bool(result.get("dev_loss"))
    lines = [f"{result.get('model')}: read bandwidth of a large tensor here {bw:.1f} GB/s ({result['threads']} threads); "
             f"LoRA peer rank {result.get('lora_rank')}.", "",
             "| format | system | batch | TPOT ms | vs fp32 | bytes/token MB | GB/s (of read bw) | next-token agreement |"
             + (" dev loss |" if has_loss else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if has_loss else "")]
    files = result.get("llama_cpp", {}).get("files", {})
    for batch, cells in result["latency"].items():
        for key, cell in cells.items():
            weights, kind = key.split("/")
            tpot = cell["tpot"]["median"]
            fp32 = cells.get(f"float32/{kind}", cell)["tpot"]["median"]
            nbytes = result["weight_bytes"][key]
            gbs = nbytes / tpot / 1e9
            system = f"llama.cpp {files[weights]['type']}" if kind == "llama_cpp" else kind
            loss = result.get("dev_loss", {}).get(key)
            lines.append(f"| {weights} | {system} | {batch} | {tpot * 1e3:.2f} | {tpot / fp32:.2f}x | {nbytes / 1e6:.0f} | "
                         f"{gbs:.1f} ({gbs / bw:.0%}) | {result['agreement'][key]:.1%} |"
                         + ((f" {loss:.4f} |" if loss is not None else " |") if has_loss else ""))
    report = result.get("llama_cpp", {})
    if report.get("skipped"):
        lines += ["", f"llama.cpp rows left out: {report['skipped']}."]
    elif report:
        lines += ["", f"llama.cpp: batch 1 only (llama-cpp-python's Llama decodes one sequence), from {report['source']} "
                  f"({report['source_type']}); extra weight buffers {'on' if report['extra_buffers'] else 'off (AMX CPU)'}."]
    if result.get("targets"):
        lines += ["", "| target | value | limit | met |", "|---|---|---|---|"]
        lines += [f"| {name} | {t['value']:.3f} | {t['limit']:.2f} | {'yes' if t['met'] else 'NO'} |"
                  for name, t in result["targets"].items()]
    return "\n".join(lines)


def plot_formats(result: dict, path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

    fig, ax = plt.subplots(figsize=(9, 4))
    keys = list(dict.fromkeys(k for cells in result["latency"].values() for k in cells))  # llama.cpp: batch 1 only
    for batch, cells in result["latency"].items():
        shown = [k for k in keys if k in cells]
        ax.plot([keys.index(k) for k in shown], [cells[k]["tpot"]["median"] * 1e3 for k in shown], marker="o", ls="",
                label=f"batch {batch}")
    ax.set_xticks(range(len(keys)), keys, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("TPOT (ms)")
    ax.set_title(f"Weight formats and peers: decode time per token ({result.get('model')})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_formats_bench(result: dict, out_dir) -> object:
    return write_results(result, out_dir, "formats", format_formats_table, plot_formats)
