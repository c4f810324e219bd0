"""vLLM's Llama, Mistral and Qwen2 with one FFBA adapter fused into their GEMMs (`FFBALlamaForCausalLM`,
`FFBAMistralForCausalLM`, `FFBAQwen2ForCausalLM`; fflora's reading of the method: `shared/design/ffba.md`).

Every sub-block keeps vLLM's own layers (its attention and KV cache, rotary embedding, RMSNorm, the
parallel linear layers and their CPU / CUDA kernels); only the weights of its two GEMMs are wider:

    [q; k; v; z_f] = [W_qkv  s_b B_b; A_f  0] [u; z_b_in]        (gate|up likewise)
    [y; z_b_out]   = [W_o    s_f B_f; A_b  0] [c; phi(z_f)]      (down likewise)

The base weights load as vLLM loads Llama's; the adapter's rows and columns (`right`, `bottom` per
GEMM, written by `fflora export vllm` from fflora's own fused form) are concatenated onto them at
load, before vLLM's `process_weights_after_loading` (which prepacks CPU weights for oneDNN), so the
fused matrix is what runs. The backward adapter's state z_b crosses from the attention to the MLP of
a layer inside the layer, and from one layer's MLP to the next layer's attention beside the hidden
states (`[h | z_b]`, the design's residual-stream route), so no state lives outside the forward
pass and vLLM's torch.compile traces it as one graph.

Runs with tensor and pipeline parallel size 1 (docs/vllm.md says what more needs).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from vllm.model_executor.models.utils import extract_layer_index, maybe_prefix

PHI = {"identity": lambda x: x, "relu": torch.relu, "silu": nn.functional.silu}


def _widths(config, layer: int, sub_block: str) -> dict:
    """One sub-block's adapter ranks ("fa", "ba_in", "ba_out") and its GEMMs' extra rows and columns
    ("in_rows", "in_cols", "out_rows", "out_cols": the ranks, zero-padded); 0 where it has none."""
    zero = dict.fromkeys(("fa", "ba_in", "ba_out", "in_rows", "in_cols", "out_rows", "out_cols"), 0)
    return zero | config.fflora["layers"][layer].get(sub_block, {})


def _widened(x: torch.Tensor, extra: torch.Tensor | None, width: int) -> torch.Tensor:
    """[x | extra | 0]: `extra` (an adapter's activations) and zeros up to `width` columns after x."""
    if not width:
        return x
    return torch.cat([x, nn.functional.pad(extra.to(x.dtype), (0, width - extra.shape[-1]))], dim=-1)


class FFBALayer:
    """What FFBA adds to a vLLM decoder layer of the Llama family: its four GEMMs widened by the adapter
    (see the module docstring). Takes and gives hidden states `[h | z_b]` where the next layer's
    attention reads a backward adapter's state, plain `h` elsewhere. Mixed into each architecture's own
    layer, whose modules it calls (qkv_proj, rotary_emb, attn, o_proj, gate_up_proj, act_fn, down_proj)."""

    def _init_ffba(self, config, prefix: str) -> None:
        index = extract_layer_index(prefix)
        self.attn_w, self.mlp_w = _widths(config, index, "attn"), _widths(config, index, "mlp")
        self.phi = PHI[config.fflora.get("phi", "identity")]
        self.q_size, self.kv_size = self.self_attn.q_size, self.self_attn.kv_size
        self.intermediate = config.intermediate_size

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        z_in = None
        if self.attn_w["ba_in"]:
            hidden_states, z_in = hidden_states[..., : self.hidden_size], hidden_states[..., self.hidden_size :]
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states, z_b = self._attention(positions, hidden_states, z_in)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states, z_b = self._mlp(hidden_states, z_b)
        return (hidden_states if z_b is None else torch.cat([hidden_states, z_b], dim=-1)), residual

    def _attention(self, positions: torch.Tensor, u: torch.Tensor, z_in: torch.Tensor | None):
        attn, w = self.self_attn, self.attn_w
        out, _ = attn.qkv_proj(_widened(u, z_in, w["in_cols"]))
        q, k, v, extra = out.split([self.q_size, self.kv_size, self.kv_size, w["in_rows"]], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        c = attn.attn(q, k, v)
        out, _ = attn.o_proj(_widened(c, self.phi(extra[..., : w["fa"]]), w["out_cols"]))
        return self._split_output(out, w["ba_out"])

    def _mlp(self, u: torch.Tensor, z_in: torch.Tensor | None):
        mlp, w = self.mlp, self.mlp_w
        out, _ = mlp.gate_up_proj(_widened(u, z_in, w["in_cols"]))
        gate_up, extra = out.split([2 * self.intermediate, w["in_rows"]], dim=-1)
        c = mlp.act_fn(gate_up)
        out, _ = mlp.down_proj(_widened(c, self.phi(extra[..., : w["fa"]]), w["out_cols"]))
        return self._split_output(out, w["ba_out"])

    def _split_output(self, out: torch.Tensor, ba_out: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y, z_b): the output projection's base rows, and the backward adapter's (None where it has none)."""
        if not ba_out:
            return out[..., : self.hidden_size], None
        return out[..., : self.hidden_size], out[..., self.hidden_size : self.hidden_size + ba_out]


class FFBALlamaDecoderLayer(FFBALayer, LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__(vllm_config, prefix, config)
        self._init_ffba(config or vllm_config.model_config.hf_config, prefix)


class FFBAMistralDecoderLayer(FFBALayer, MistralDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__(vllm_config, prefix, config)
        if self.ada_rms_norm_t_cond is not None or self.self_attn.do_llama_4_scaling:
            raise ValueError("fflora's FFBA Mistral is the plain Mistral: no ada_rms_norm_t_cond, no llama_4_scaling")
        self._init_ffba(config or vllm_config.model_config.hf_config, prefix)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                t_cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's Mistral model passes `t_cond` (for ada_rms_norm, refused above): FFBA's forward."""
        return FFBALayer.forward(self, positions, hidden_states, residual)


class FFBAQwen2DecoderLayer(FFBALayer, Qwen2DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, cache_config, quant_config, prefix)
        if self.self_attn.qk_norm:
            raise ValueError("fflora's FFBA Qwen2 is the plain Qwen2: no qk_norm")
        self._init_ffba(config, prefix)


def _check(vllm_config: VllmConfig, name: str) -> Path:
    """The adapter file of an exported folder, after refusing what the FFBA models do not run."""
    config = vllm_config.model_config.hf_config
    if get_tensor_model_parallel_world_size() != 1 or get_pp_group().world_size != 1:
        raise ValueError("fflora's FFBA models run with --tensor-parallel-size 1 and --pipeline-parallel-size 1 "
                         "for now (docs/vllm.md: what more parallelism needs)")
    if not isinstance(getattr(config, "fflora", None), dict):
        raise ValueError(f"this config names {name} but has no 'fflora' section: write the folder with "
                         "`fflora export vllm --adapter DIR --output DIR`")
    return Path(vllm_config.model_config.model) / config.fflora["adapter"]


class FFBAWeights:
    """Loads an exported folder: the base weights as vLLM loads the architecture's, then each GEMM
    widened by the adapter's rows and columns (`adapter_file`)."""

    adapter_file: Path

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        extras = load_file(str(self.adapter_file))
        for name, module in self.named_modules():
            right, bottom = extras.get(f"{name}.ffba_right"), extras.get(f"{name}.ffba_bottom")
            if right is None and bottom is None:
                continue
            weight = module.weight.data
            if right is not None:
                weight = torch.cat([weight, right.to(weight)], dim=1)
            if bottom is not None:
                weight = torch.cat([weight, bottom.to(weight)], dim=0)
                if getattr(module, "bias", None) is not None:  # the adapter's rows carry no bias
                    module.bias = nn.Parameter(torch.cat([module.bias.data, module.bias.new_zeros(bottom.shape[0])]),
                                               requires_grad=False)
            module.weight = nn.Parameter(weight, requires_grad=False)
            module.input_size, module.output_size = weight.shape[1], weight.shape[0]
        return loaded


class FFBALlamaForCausalLM(FFBAWeights, LlamaForCausalLM):
    """A Llama checkpoint plus one fused FFBA adapter (a folder `fflora export vllm` wrote)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        adapter_file = _check(vllm_config, type(self).__name__)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=FFBALlamaDecoderLayer)
        self.adapter_file = adapter_file


class FFBAMistralForCausalLM(FFBAWeights, MistralForCausalLM):
    """A Mistral checkpoint plus one fused FFBA adapter."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        adapter_file = _check(vllm_config, type(self).__name__)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=FFBAMistralDecoderLayer)
        self.adapter_file = adapter_file


class FFBAQwen2ForCausalLM(FFBAWeights, Qwen2ForCausalLM):
    """A Qwen2 checkpoint plus one fused FFBA adapter. vLLM's Qwen2ForCausalLM builds its model with the
    stock layer; this is its constructor with FFBA's layer (vLLM 0.32.0's, tensor and pipeline parallel 1)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        adapter_file = _check(vllm_config, type(self).__name__)
        nn.Module.__init__(self)
        self.adapter_file = adapter_file
        config = vllm_config.model_config.hf_config.get_text_config()
        self.config, self.quant_config = config, vllm_config.quant_config
        self.model = Qwen2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                decoder_layer_type=FFBAQwen2DecoderLayer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
