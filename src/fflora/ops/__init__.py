"""The numerical building blocks under every method: `gemm` (how one weight's GEMM runs: its memory
layout and operand order)."""
