"""zFLoRA, the zero-latency member of the family (design: shared/design/zflora.md): the adapter state
rides in r extra residual channels. `config`: `ZFLoRAConfig`; `layers`: its parameters and training
form; `model`: apply, remove, parameter names; `fused`: the widened base GEMMs; `method`: all of it
behind the `Method` interface; `tuner`: its PEFT tuner. Use it through `fflora.apply_adapter` with a
`fflora.ZFLoRAConfig`, or `peft.get_peft_model`."""
