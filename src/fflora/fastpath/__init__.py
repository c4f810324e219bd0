"""The decode fast path: how GEMMs run and how a decode step runs, for any model.

* `plan`: `plan_modules` measures and picks each GEMM's weight layout and operand order
  (`fflora.ops.gemm` runs the choice);
* `compile`: `compile_generation` runs each decode step of `generate` as one `torch.compile` graph.

Below `methods/`, it knows nothing of adapters or fused models: `FusedModel.plan` and
`FusedModel.compile` (public as `fflora.plan_gemms` and `fflora.compile_decode`) hand it the fused
GEMMs and keep what it changed, so that unfusing undoes it.
"""
