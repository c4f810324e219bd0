"""FFBA, fused forward-backward adapters. `config`: `FFBAConfig`; `adapter`: the adapter math of one
sub-block and the state that crosses sub-blocks; `layers`: the training form; `model`: apply, remove,
parameter names; `fused`: the adapter inside the base GEMMs; `bank`: many adapters resident in one
fused model; `method`: all of it behind the `Method` interface; `tuner`: its PEFT tuner. Use it
through `fflora.apply_adapter` with a `fflora.FFBAConfig`, or `peft.get_peft_model`."""
