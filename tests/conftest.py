"""Tiny random models of every supported architecture (seconds per test, no downloads)."""

import pytest
import torch

import fflora
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

_COMMON = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),  # biases on q/k/v
    # head_dim * heads != hidden, q/k norms, sliding-window layers
    "gemma3_text": lambda: Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
}
ARCHS = list(CONFIGS)


def make_model(arch: str, seed: int = 0, attn: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "qwen2":  # random biases so that fusing them is really tested
        with torch.no_grad():
            for layer in model.model.layers:
                for p in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, p).bias.normal_(0, 0.1)
    return model.eval()


def randomize_adapters(model, seed: int = 1, std: float = 0.05):
    """Non-zero values for every adapter tensor (fresh up-projections are zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


FAMILIES = {"ffba": lambda: fflora.FFBAConfig(r=4, alpha=8), "zflora": lambda: fflora.ZFLoRAConfig(r=4, alpha=8)}


@pytest.fixture(params=list(FAMILIES))
def adapter_config(request, arch):
    """An adapter configuration of each family, on each architecture that family supports."""
    if request.param == "zflora" and arch == "gemma3_text":
        pytest.skip("zFLoRA refuses Gemma 3 (test_zflora.py tests the error)")
    return FAMILIES[request.param]()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random Llama with a character-level tokenizer, saved as a local model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz ?.,!'0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    model = make_model("llama", max_position_embeddings=1024)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _commonsense_records(dataset, split, n):
    choices = {"boolq": ["true", "false"], "piqa": ["cut it", "eat it"], "winogrande": ["Ann", "Bob"]}
    records = []
    for i in range(n):
        options = choices.get(dataset, ["red", "blue", "green", "gray"])
        records.append({"id": f"{dataset}-{split}-{i}", "dataset": dataset, "question": f"q{i} about {dataset}?",
                        "choices": options, "label": i % len(options)})
    return records


def write_jsonl(path, records):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(autouse=True)
def _machine_dtype_in_a_temporary_folder(tmp_path_factory, monkeypatch):
    """`dtype="auto"` keeps its measurement per machine in the user's cache: a test's tiny model must
    not write there (nor read what a real run kept)."""
    import fflora.recipes.dtype as dtype_module

    cache = tmp_path_factory.mktemp("machine-dtype") / "machine-dtype.json"
    monkeypatch.setattr(dtype_module, "machine_dtype_file", lambda: cache)


@pytest.fixture
def tiny_data_dir(tmp_path):
    """Canonical splits of every task, a few records each, written as `fflora data prepare` would."""
    from fflora.recipes.data import FAMILIES

    root = tmp_path / "data"
    for dataset in FAMILIES["commonsense"]:
        for split, n in (("train", 8), ("test", 5)):
            write_jsonl(root / "commonsense" / dataset / f"{split}.jsonl", _commonsense_records(dataset, split, n))
    for dataset in FAMILIES["math"]:
        write_jsonl(root / "math" / dataset / "test.jsonl",
                    [{"id": f"{dataset}-test-{i}", "dataset": dataset, "question": f"What is {i} + 1?", "answer": i + 1.0}
                     for i in range(4)])
    write_jsonl(root / "math" / "gsm8k" / "train.jsonl",
                [{"id": f"gsm8k-train-{i}", "dataset": "gsm8k", "question": f"What is {i} + 2?", "answer": i + 2.0,
                  "solution": f"{i} + 2 = {i + 2}."} for i in range(8)])
    for split, n in (("train", 6), ("test", 3)):
        write_jsonl(root / "summary" / "xsum" / f"{split}.jsonl",
                    [{"id": f"xsum-{split}-{i}", "dataset": "xsum", "document": f"a short story number {i}.",
                      "summary": f"story {i}."} for i in range(n)])
    return root
