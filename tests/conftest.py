"""Tiny random models of every supported architecture (seconds per test, no downloads)."""

import pytest
import torch
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


def make_model(arch: str, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
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
    model = make_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
