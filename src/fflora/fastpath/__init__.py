"""The decode fast path of a fused model: how its GEMMs run and how its decode step runs.

* `plan`: `plan_gemms` measures and picks each fused GEMM's (and the LM head's) weight layout and
  operand order (`fflora.ops.gemm` runs the choice);
* `compile`: `compile_decode` runs each decode step as one `torch.compile` graph.

The public functions are `fflora.plan_gemms` and `fflora.compile_decode`.
"""
