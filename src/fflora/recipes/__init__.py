"""What the CLI runs, built from the components: `data` and `prompts` (the tasks), `examples`
(tokens, labels, packed batches), `train`, `evaluate`, `study` (the accuracy study), `demo` (the
main job), `artifacts` (open what training wrote), `budget` (parameter budgets against LoRA),
`metrics` and `stats`."""
