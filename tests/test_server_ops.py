"""`fflora serve` in operation: /metrics, request ids, one error shape everywhere, and shutdown with a
drain deadline. A real uvicorn server on 127.0.0.1 (tiny model), stopped by its process id."""

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest
from conftest import make_model
from prometheus_client.parser import text_string_to_metric_families
from test_server import BASE, _tokenizer

from fflora.serving.process import ServerProcess


def _base(root, context=256):
    model = make_model("llama", max_position_embeddings=context)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    return ["--model", str(root / "base"), "--served-model-name", BASE, "--max-adapters", "1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    process = ServerProcess([*_base(root), "--limit-max-requests", "100", "--log-level", "info"], root / "server.log",
                            ready_timeout_s=120)
    with process:  # stopped by its process id
        yield process


def _metrics(url) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" not in sample.labels:
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_metrics_count_what_was_sent(server):
    before = _metrics(server.url)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    for prompt in prompts:
        body = {"model": BASE, "prompt": prompt, "max_tokens": 5, "ignore_eos": True, "temperature": 0}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).status_code == 200
    body = {"model": BASE, "prompt": [5, 6], "max_tokens": 4, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        assert sum(1 for line in response.iter_lines() if line.startswith("data: {")) >= 1
    after = _metrics(server.url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["fflora:prompt_tokens_total"] == 3 + 2 + 4 + 2
    assert delta["fflora:generation_tokens_total"] == 3 * 5 + 4
    assert delta["fflora:request_success_total{finished_reason=length}"] == 4
    assert delta["fflora:time_to_first_token_seconds_count"] == 4
    assert delta["fflora:e2e_request_latency_seconds_count"] == 4
    assert delta["fflora:inter_token_latency_seconds_count"] == 3 * 4 + 3  # every token after the first
    assert delta[f"fflora:model_requests_total{{model={BASE}}}"] == 4
    assert delta[f"fflora:model_generation_tokens_total{{model={BASE}}}"] == 3 * 5 + 4
    assert after["fflora:num_requests_running"] == 0 and after["fflora:num_requests_waiting"] == 0
    assert after["fflora:adapters_resident"] == 0 and after["fflora:bank_rank_used{space=fa.attn}"] == 0
    assert after["fflora:bank_rank_budget"] == 8  # no adapter and no run-time loading: the least room
    assert ("adapter bank: room for rank 8 per rank space, what the --adapter adapters take (no adapter loads at run "
            "time without --enable-adapter-loading") in server.log_path.read_text()


def test_every_response_carries_a_request_id_and_the_log_shows_it(server):
    mine = httpx.get(f"{server.url}/v1/models", headers={"X-Request-Id": "client-abc.1"}, timeout=10)
    assert mine.headers["x-request-id"] == "client-abc.1"
    made = httpx.get(f"{server.url}/nope", headers={"X-Request-Id": "bad id with spaces"}, timeout=10)
    assert re.fullmatch(r"req-[0-9a-f]{32}", made.headers["x-request-id"])
    too_large = httpx.post(f"{server.url}/v1/completions", content=b"x" * (2 << 20), timeout=30)
    assert too_large.status_code == 413 and too_large.headers["x-request-id"].startswith("req-")
    deadline = time.monotonic() + 10
    while "[client-abc.1]" not in server.log_path.read_text() or made.headers["x-request-id"] not in server.log_path.read_text():
        assert time.monotonic() < deadline, server.log_path.read_text()[-2000:]
        time.sleep(0.1)


@pytest.mark.parametrize("method, path, content, status", [
    ("GET", "/nope", None, 404),
    ("GET", "/v1/completions", None, 405),
    ("POST", "/v1/completions", b"\xff\xfe not utf-8", 400),
    ("POST", "/v1/completions", b"[" * 10_000 + b"]" * 10_000, 400),
    ("POST", "/v1/completions", b'{"model": 1}', 400),
])
def test_every_error_has_openai_shape(server, method, path, content, status):
    response = httpx.request(method, f"{server.url}{path}", content=content, timeout=30,
                             headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status and error["message"]


def test_shutdown_drains_then_ends_long_streams_with_an_error_and_done(tmp_path):
    args = [*_base(tmp_path, context=4096), "--shutdown-timeout", "1", "--log-level", "warning"]
    process = ServerProcess(args, tmp_path / "server.log", ready_timeout_s=120).start()
    events = [[] for _ in range(3)]

    def stream(i):
        body = {"model": BASE, "prompt": [5, 6, 7], "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{process.url}/v1/completions", json=body, timeout=60) as response:
            events[i].extend(line for line in response.iter_lines() if line.startswith("data: "))

    try:
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        waited = time.monotonic()
        while not all(events):  # every stream has its first token (on a loaded machine prefill takes a while)
            assert time.monotonic() - waited < 60, "the streams did not start"
            time.sleep(0.05)
        start = time.monotonic()
        os.kill(process.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{process.url}/health", timeout=2)
        code = process.proc.wait(timeout=30)
        elapsed = time.monotonic() - start
        for t in threads:
            t.join(timeout=30)
    finally:
        if process.proc.poll() is None:
            process.stop()
    assert code == 0
    assert elapsed < 1 + 1 + 0.5, elapsed  # the deadline, one second to stop (measured 1.7 s), slack for a busy CI
    for lines in events:
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert "shut down" in error["message"] and error["code"] == 503
        assert len(lines) > 3  # tokens kept coming during the drain, before the deadline
