"""The fused weight formats side by side: decode speed, bytes read per token, and agreement with float32.

For each format (`fflora.fuse(model, weights=...)`) the fused base and FFBA fused (a trained adapter
given as `adapter`, or a random one of rank `rank`), compiled for each batch size as `fflora.compile_decode` does, timed interleaved in one
process (TTFT, TPOT: medians of `repeats` rounds). Bytes per token are the weights one decode step
reads (every GEMM and the LM head; the embedding table only where the head is it); GB/s is that over
TPOT, next to the read bandwidth of a large tensor measured in the same run. Quality: teacher-forced
next-token agreement with the float32 model of the same kind on a fixed English text, and with a
trained adapter its dev loss (the held-out records of `dev_task`, in `dev_form`) in every format.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import matplotlib
import torch
from torch import nn

from ..fastpath.compile import compile_decode
from ..methods import fuse, load_adapter
from ..methods.weight_formats import WEIGHT_FORMATS, check_weights
from ..models.footprint import tensor_bytes
from ..recipes.evaluate import response_loss
from ..recipes.train import dev_records
from ..utils.sources import say
from .latency import _adapted, _median_spread, _randomize, check_sizes, time_generation, write_results

KINDS = ("fused_base", "ffba_fused")
TEXT = ("The river ran high that spring, and the mill at the bend of the valley worked from dawn until the "
        "lamps were lit. Farmers brought their grain in carts, and the miller, a patient man with flour in his "
        "beard, weighed every sack twice. Children watched the great wheel turn and counted the buckets as they "
        "rose dripping from the water. In the evenings the village gathered at the inn to talk of the harvest, "
        "of the prices in the market town, and of the letters that came, now and then, from those who had gone "
        "to the cities in the north. ") * 3


@dataclass
class FormatsBenchSettings:
    formats: tuple[str, ...] = WEIGHT_FORMATS
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    new_tokens: int = 32
    repeats: int = 3
    warmup: int = 1
    rank: int = 8
    compile: bool = True
    seed: int = 0
    adapter: str | None = None  # a trained FFBA adapter folder (None: a random adapter of rank `rank`)
    dev_task: str = "commonsense"
    dev_form: str = "cloze"
    dev_size: int = 200
    data_dir: str | None = None

    def __post_init__(self) -> None:
        self.formats, self.batch_sizes = tuple(self.formats), tuple(self.batch_sizes)
        for weights in self.formats:
            check_weights(weights)
        if "float32" not in self.formats:
            raise ValueError("formats must include 'float32' (agreement is measured against it)")
        check_sizes(self, lists=("batch_sizes",), positive=("prompt_len", "new_tokens", "repeats", "rank"))


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


@torch.no_grad()
def agreement(model: nn.Module, reference_argmax: torch.Tensor, ids: torch.Tensor) -> float:
    return (model(ids).logits.argmax(-1) == reference_argmax).float().mean().item()


def run_formats_bench(base: nn.Module, tokenizer, settings: FormatsBenchSettings) -> dict:
    """Every (format, kind) model, timed per batch size; `base` stays untouched."""
    models = {}
    for weights in settings.formats:
        for kind in KINDS:
            model = copy.deepcopy(base)
            if kind == "ffba_fused" and settings.adapter:
                load_adapter(model, settings.adapter, strict=True)
            elif kind == "ffba_fused":
                _randomize(_adapted(model, "ffba", settings.rank), settings.seed)
            models[weights, kind] = fuse(model, weights=weights).eval()
    text_ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :512]
    reference = {kind: models["float32", kind](text_ids).logits.argmax(-1) for kind in KINDS}
    quality = {f"{w}/{k}": agreement(m, reference[k], text_ids) for (w, k), m in models.items()}
    dev_loss = {}
    if settings.adapter:
        records = dev_records(settings.dev_task, settings.dev_size, settings.data_dir)
        for (weights, kind), model in models.items():
            say(f"dev loss of {weights} {kind}")
            dev_loss[f"{weights}/{kind}"] = response_loss(model, tokenizer, records, form=settings.dev_form)
    latency, compile_s = {}, {}
    vocab = base.config.get_text_config().vocab_size
    for batch in settings.batch_sizes:
        ids = torch.randint(10, vocab, (batch, settings.prompt_len), generator=torch.Generator().manual_seed(settings.seed))
        if settings.compile:
            for (weights, kind), model in models.items():
                say(f"compiling {weights} {kind} for batch {batch}")
                start = time.perf_counter()
                compile_decode(model)
                time_generation(model, ids, settings.new_tokens)
                compile_s[f"{weights}/{kind}/{batch}"] = time.perf_counter() - start
        samples = {key: {"ttft": [], "tpot": []} for key in models}
        for round_ in range(settings.warmup + settings.repeats):
            say(f"formats batch {batch}: round {round_ + 1}/{settings.warmup + settings.repeats}")
            for key, model in models.items():
                ttft, tpot = time_generation(model, ids, settings.new_tokens)
                if round_ >= settings.warmup:
                    samples[key]["ttft"].append(ttft)
                    samples[key]["tpot"].append(tpot)
        latency[str(batch)] = {f"{w}/{k}": {m: _median_spread(v) for m, v in s.items()} for (w, k), s in samples.items()}
    return {"settings": asdict(settings), "threads": torch.get_num_threads(), "read_bandwidth_gb_s": read_bandwidth(),
            "weight_bytes": {f"{w}/{k}": weight_bytes(m) for (w, k), m in models.items()},
            "agreement": quality, "dev_loss": dev_loss, "latency": latency, "compile_s": compile_s}


def format_formats_table(result: dict) -> str:
    bw = result["read_bandwidth_gb_s"]
    lines = [f"Read bandwidth of a large tensor here: {bw:.1f} GB/s ({result['threads']} threads).", "",
             "| format | model | batch | TPOT ms | vs fp32 | bytes/token MB | GB/s (of read bw) | next-token agreement |"
             + (" dev loss |" if result.get("dev_loss") else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if result.get("dev_loss") else "")]
    for batch, cells in result["latency"].items():
        for key, cell in cells.items():
            weights, kind = key.split("/")
            tpot = cell["tpot"]["median"]
            fp32 = cells[f"float32/{kind}"]["tpot"]["median"]
            nbytes = result["weight_bytes"][key]
            gbs = nbytes / tpot / 1e9
            loss = result.get("dev_loss", {}).get(key)
            lines.append(f"| {weights} | {kind} | {batch} | {tpot * 1e3:.2f} | {tpot / fp32:.2f}x | {nbytes / 1e6:.0f} | "
                         f"{gbs:.1f} ({gbs / bw:.0%}) | {result['agreement'][key]:.1%} |"
                         + (f" {loss:.4f} |" if loss is not None else (" |" if result.get("dev_loss") else "")))
    return "\n".join(lines)


def plot_formats(result: dict, path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

    fig, ax = plt.subplots(figsize=(7, 4))
    for batch, cells in result["latency"].items():
        keys = list(cells)
        ax.plot(range(len(keys)), [cells[k]["tpot"]["median"] * 1e3 for k in keys], marker="o", label=f"batch {batch}")
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("TPOT (ms)")
    ax.set_title("Fused weight formats: decode time per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_formats_bench(result: dict, out_dir) -> object:
    return write_results(result, out_dir, "formats", format_formats_table, plot_formats)
