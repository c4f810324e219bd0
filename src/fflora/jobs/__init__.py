"""Jobs that combine the recipes (training, evaluation) with the benchmarks: `demo` (the main job) and
`compare` (an A/B of methods on one recipe). They sit above both, so neither imports the other."""
