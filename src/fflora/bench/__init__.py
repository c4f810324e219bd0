"""Benchmarks: latency of one adapter (`latency`), many adapters in one batch (`bank`), and
end-to-end serving over HTTP (`serve`). Each measures methods interleaved in one run and reports
ratios, JSON, a markdown table and a PNG; `fflora bench [bank|serve]` runs them."""
