"""`fflora export vllm`: a model folder vLLM serves with `--model DIR`, for a base model and one FFBA
adapter (the model classes: `fflora.vllm.model`, for Llama, Mistral and Qwen2).

The folder holds the base model's config with the architecture renamed and an `fflora` section (the
adapter's ranks per layer and sub-block, its phi), links to the base model's weights and tokenizer
files (copies where the filesystem has no links), and `ffba/adapter.safetensors`: per fused GEMM of
fflora's own fused form, the columns to the right of the base block (`ffba_right`: the backward
adapter's up-projections, or the forward adapter's, scaled) and the rows below it (`ffba_bottom`:
the down-projections), without fflora's CPU zero padding. vLLM loads the base weights as it loads
the architecture's and concatenates these onto them: the matrices it runs are fflora's fused ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..methods import adapter_folder, adapter_state_dict, fuse, load_adapter, registry
from ..models.architectures import sub_blocks
from ..models.base_models import load_base_model, model_source
from ..utils.files import atomic_write, atomic_write_text
from ..utils.sources import say

ADAPTER_FILE = "ffba/adapter.safetensors"  # in a subfolder: vLLM loads every top-level *.safetensors as base weights
# vLLM's module names for each sub-block's two GEMMs
VLLM_GEMMS = {"attn": ("self_attn.qkv_proj", "self_attn.o_proj"), "mlp": ("mlp.gate_up_proj", "mlp.down_proj")}
SUPPORTED = {"llama": "FFBALlamaForCausalLM", "mistral": "FFBAMistralForCausalLM", "qwen2": "FFBAQwen2ForCausalLM"}


def _extras(gemm, base_rows: int, base_cols: int) -> dict[str, torch.Tensor]:
    """The adapter's part of a fused GEMM (dense float32): its columns right of the base block and its
    rows below it, with fflora's zero padding (each widened side a multiple of 8: odd GEMM sizes ran
    slower here, and bfloat16 kernels want the alignment most)."""
    weight = gemm.storage.weight.detach().float()  # fused dense (export fuses in the model's dtype)
    out = {}
    if gemm.n_cols > base_cols:
        out["ffba_right"] = weight[:base_rows, base_cols:].contiguous()
    if gemm.n_rows > base_rows:
        out["ffba_bottom"] = weight[base_rows:, :].contiguous()
    return out


def export_vllm(adapter: str | os.PathLike, output: str | os.PathLike, model: str | None = None) -> Path:
    """Write the vLLM model folder for `adapter` (an FFBA adapter or the run folder holding one) on its
    base model (`model`, default the embedded one) to `output`; returns the folder."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"{output} exists and is not empty; give a new --output folder")
    source = Path(model_source(model))
    if not (source / "config.json").is_file():
        raise ValueError(f"--model {model!r} is not a local model folder; vLLM's folder links the base model's files: "
                         "download it first (e.g. `hf download NAME --local-dir DIR`) and pass that folder")
    base, _ = load_base_model(model)
    if base.config.model_type not in SUPPORTED:
        raise ValueError(f"fflora's vLLM model covers {sorted(SUPPORTED)} so far, not {base.config.model_type!r}")
    load_adapter(base, adapter_folder(adapter), strict=True)
    method = registry.method_of(base)
    if method is None or not method.exports_to_vllm:
        raise ValueError(f"{adapter} is a {method.name if method else 'no'} adapter; vLLM takes FFBA adapters "
                         "(zFLoRA: see docs/vllm.md)")
    phi = registry.adapter_config(base).phi
    weights = adapter_state_dict(base)  # canonical keys: the adapter's ranks are its matrices' sizes

    def rank(key: str, dim: int) -> int:
        return weights[key].shape[dim] if key in weights else 0

    fuse(base)
    tensors, layers = {}, [{} for _ in range(base.config.num_hidden_layers)]
    for index, _, name, spec, holder in sub_blocks(base):
        group, out = holder.ffba_fused_inputs, getattr(holder, spec.output)
        # the adapter's ranks, and each GEMM's extra rows and columns (the ranks, zero-padded)
        key = f"layers.{index}.{name}."
        layers[index][name] = {"fa": rank(key + "fa_down", 0), "ba_in": rank(key + "ba_up", 1), "ba_out": rank(key + "ba_down", 0),
                               "in_rows": group.n_rows - group.base_rows, "in_cols": group.n_cols - group.d_in,
                               "out_rows": out.n_rows - out.d_out, "out_cols": out.n_cols - out.d_core}
        inputs, output_gemm = VLLM_GEMMS[name]
        for module, part in ((inputs, _extras(group, group.base_rows, group.d_in)),
                             (output_gemm, _extras(out, out.d_out, out.d_core))):
            tensors |= {f"model.layers.{index}.{module}.{key}": t for key, t in part.items()}
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(output / ADAPTER_FILE, lambda tmp: save_file(tensors, tmp))
    config = json.loads((source / "config.json").read_text())
    config |= {"architectures": [SUPPORTED[base.config.model_type]],
               "fflora": {"method": method.name, "adapter": ADAPTER_FILE, "phi": phi, "layers": layers,
                          "base": str(source.resolve()), "adapter_source": str(Path(adapter).resolve())}}
    atomic_write_text(output / "config.json", json.dumps(config, indent=2) + "\n")
    for file in source.iterdir():  # the base weights and tokenizer, linked
        if file.name != "config.json" and file.is_file():
            _link(file, output / file.name)
    say(f"vLLM model folder in {output}: serve it with  python -m vllm.entrypoints.openai.api_server --model {output}")
    return output


def _link(source: Path, target: Path) -> None:
    try:
        target.symlink_to(source.resolve())
    except OSError:  # a filesystem without links
        shutil.copy2(source, target)
