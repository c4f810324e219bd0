"""The base models fflora adapts: `architectures` (where each supported architecture keeps its
sub-blocks' projections) and `base_models` (`load_base_model`, the embedded default model); `footprint` (the bytes a model's tensors hold)."""
