"""`/metrics`: the server's state and latencies in Prometheus' text format (prometheus_client).

The names are vLLM's (its `vllm:` names under an `fflora:` prefix), so that dashboards built for
vLLM's OpenAI server need only the prefix changed:

    fflora:num_requests_running, fflora:num_requests_waiting            gauges, read at each scrape
    fflora:time_to_first_token_seconds, fflora:inter_token_latency_seconds,
    fflora:e2e_request_latency_seconds                                   histograms
    fflora:prompt_tokens_total, fflora:generation_tokens_total            counters
    fflora:request_success_total{finished_reason="stop"|"length"|"abort"}
and fflora's own: fflora:model_requests_total{model}, fflora:model_generation_tokens_total{model}
(per requested model: the base model, an adapter, a merged LoRA), and the bank's:
fflora:adapters_resident, fflora:bank_rank_used{space}, fflora:bank_rank_budget,
fflora:adapter_loads_total (from start: the --adapter ones too), fflora:adapter_unloads_total; and the
engine's fflora:kv_slots_used and fflora:kv_slots_free.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)


class _StateCollector:
    """The gauges, read from the engine, the waiting line and the bank when scraped."""

    def __init__(self, serving) -> None:
        self.serving = serving

    def collect(self):
        engine, bank = self.serving.engine, self.serving.engine.bank
        waiting = self.serving.admission.requests
        running = GaugeMetricFamily("fflora:num_requests_running", "Requests generating (past their first token).")
        running.add_metric([], max(0, sum(engine.running_requests().values()) - waiting))
        queued = GaugeMetricFamily("fflora:num_requests_waiting", "Requests waiting for their first token.")
        queued.add_metric([], waiting)
        resident = GaugeMetricFamily("fflora:adapters_resident", "Adapters loaded in the bank.")
        resident.add_metric([], len(bank.names()))
        used = GaugeMetricFamily("fflora:bank_rank_used", "Rank taken by resident adapters, per rank space.",
                                 labels=["space"])
        for space, rank in bank.rank_used().items():
            used.add_metric([space], rank)
        budget = GaugeMetricFamily("fflora:bank_rank_budget", "Rank room per rank space.")
        budget.add_metric([], bank.rank_budget)
        yield from (running, queued, resident, used, budget)
        for name, value in engine.kv_usage().items():  # KV slots in use and free
            gauge = GaugeMetricFamily(f"fflora:kv_{name}", f"KV-cache {name.replace('_', ' ')}.")
            gauge.add_metric([], value)
            yield gauge


class ServerMetrics:
    """Everything `/metrics` reports for one server (its own registry: several servers in one process,
    e.g. tests, do not mix)."""

    def __init__(self, serving) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(serving))
        kw = {"registry": self.registry}
        self.ttft = Histogram("fflora:time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS, **kw)
        self.itl = Histogram("fflora:inter_token_latency_seconds", "Time between two tokens of a request.",
                             buckets=_LATENCY_BUCKETS, **kw)
        self.e2e = Histogram("fflora:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             buckets=_LATENCY_BUCKETS, **kw)
        # prometheus_client appends _total to counters itself
        self.prompt_tokens = Counter("fflora:prompt_tokens", "Prompt tokens of finished requests.", **kw)
        self.generation_tokens = Counter("fflora:generation_tokens", "Tokens generated.", **kw)
        self.success = Counter("fflora:request_success", "Finished requests, by finish reason.",
                               ["finished_reason"], **kw)
        self.model_requests = Counter("fflora:model_requests", "Finished requests, per requested model.", ["model"], **kw)
        self.model_tokens = Counter("fflora:model_generation_tokens", "Tokens generated, per requested model.",
                                    ["model"], **kw)
        self.loads = Counter("fflora:adapter_loads", "Adapters loaded, from start (the --adapter ones too).", **kw)
        self.unloads = Counter("fflora:adapter_unloads", "Adapters unloaded at run time.", **kw)

    def render(self) -> bytes:
        return generate_latest(self.registry)
