"""`FFBALlamaForCausalLM`: vLLM's Llama with one FFBA adapter fused into its GEMMs (fflora's reading of
the method: `shared/design/ffba.md`).

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
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

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


class FFBALlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer with its four GEMMs widened by the adapter (see the module docstring).
    Takes and gives hidden states `[h | z_b]` where the next layer's attention reads a backward
    adapter's state, plain `h` elsewhere."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__(vllm_config, prefix, config)
        config = config or vllm_config.model_config.hf_config
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


class FFBALlamaForCausalLM(LlamaForCausalLM):
    """A Llama checkpoint plus one fused FFBA adapter (a folder `fflora export vllm` wrote)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if get_tensor_model_parallel_world_size() != 1 or get_pp_group().world_size != 1:
            raise ValueError("fflora's FFBA model runs with --tensor-parallel-size 1 and --pipeline-parallel-size 1 "
                             "for now (docs/vllm.md: what more parallelism needs)")
        if not isinstance(getattr(config, "fflora", None), dict):
            raise ValueError("this config names FFBALlamaForCausalLM but has no 'fflora' section: write the folder "
                             "with `fflora export vllm --adapter DIR --output DIR`")
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=FFBALlamaDecoderLayer)
        self.adapter_file = Path(vllm_config.model_config.model) / config.fflora["adapter"]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base weights as vLLM loads Llama's, then each GEMM widened by the adapter's rows and columns."""
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
