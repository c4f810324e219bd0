"""The decode fast path of a fused model: how its GEMMs run and how its decode step runs.

* `gemm`: one GEMM in a chosen weight layout and operand order;
* `plan`: `plan_gemms` measures and picks those for every fused GEMM and the LM head;
* `compile`: `compile_decode` runs each decode step as one `torch.compile` graph.

Nothing is imported here, so that `fflora.fused` can use `gemm` without a cycle; the public
functions are `fflora.plan_gemms` and `fflora.compile_decode`.
"""
