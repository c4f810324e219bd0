"""`fflora serve`: a real uvicorn server on 127.0.0.1, driven by the `openai` client and raw HTTP.

One server process for the module (a tiny random Llama, two adapters), started with a bounded
request budget and stopped by its process id at the end.
"""

import functools
import json
import socket
import threading
import time

import httpx
import openai
import peft
import pytest
import torch
from conftest import make_model, randomize_adapters

import fflora
from fflora.recipes.budget import LORA_TARGETS
from fflora.serving.process import ServerProcess

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
BASE = "tiny-base"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), 128)})  # every id the model can emit decodes
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class Server:
    def __init__(self, root):
        self.root = root
        self.tokenizer = _tokenizer()
        model = make_model("llama", max_position_embeddings=256)
        model.generation_config.eos_token_id = 2
        model.save_pretrained(root / "base")
        self.tokenizer.save_pretrained(root / "base")
        configs = {"a": fflora.FFBAConfig(r=4, alpha=8), "b": fflora.FFBAConfig(r=8, forward=False)}
        for seed, (name, config) in enumerate(configs.items(), start=1):
            adapted = fflora.apply_ffba(make_model("llama", max_position_embeddings=256), config)
            randomize_adapters(adapted, seed=seed, std=0.3)
            fflora.save_adapter(adapted, root / name)
        lora = peft.get_peft_model(make_model("llama", max_position_embeddings=256),
                                   peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
        randomize_adapters(lora, seed=3, std=0.3)
        lora.save_pretrained(root / "l")  # what `fflora train --method lora` writes
        args = ["--model", str(root / "base"), "--served-model-name", BASE, "--adapter", f"a={root / 'a'}",
                "--adapter", f"b={root / 'b'}", "--adapter", f"l={root / 'l'}", "--max-adapters", "3",
                "--limit-max-requests", "300",
                "--enable-adapter-loading", "--adapter-root", str(root), "--log-level", "warning"]
        self.process = ServerProcess(args, root / "server.log", ready_timeout_s=120)

    def connect(self):
        self.url = self.process.url
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)

    @torch.no_grad()
    def expected(self, adapter, prompt_ids, max_new_tokens):
        """Greedy text of the fused model carrying only `adapter` (None: the base; "l": the LoRA adapter,
        merged through PEFT), in this process."""
        model = make_model("llama", max_position_embeddings=256)
        if adapter == "l":
            model = peft.PeftModel.from_pretrained(model, self.root / "l").merge_and_unload()
        elif adapter is not None:
            fflora.load_adapter(model, self.root / adapter)
        out = fflora.fuse(model).generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                                          do_sample=False, eos_token_id=2, pad_token_id=0)
        return self.tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)

    def health(self):
        return httpx.get(f"{self.url}/health", timeout=5).json()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serve"))
    with server.process:  # stopped by its process id when the module's tests are done
        server.connect()
        yield server


def test_models_lists_the_base_model_then_each_adapter(server):
    models = server.client.models.list().data
    assert [m.id for m in models] == [BASE, "a", "b", "l"]  # the FFBA bank's adapters, then the merged LoRA
    assert [getattr(m, "parent", None) for m in models] == [None, BASE, BASE, BASE]
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "\nfflora:adapter_loads_total 3.0\n" in metrics  # counted from start: the three --adapter ones
    # idle: all 8 slots free (--max-num-seqs default)
    assert "\nfflora:kv_slots_used 0.0\n" in metrics and "\nfflora:kv_slots_free 8.0\n" in metrics


def test_a_lora_adapter_is_served_merged_as_a_model_of_its_own(server):
    ids = server.tokenizer("Hello there")["input_ids"]
    lora, ffba = (server.client.completions.create(model=m, prompt="Hello there", max_tokens=12, temperature=0)
                  for m in ("l", "a"))
    assert lora.model == "l" and lora.choices[0].text == server.expected("l", ids, 12)  # = PEFT's LoRA, merged
    assert ffba.choices[0].text == server.expected("a", ids, 12) != lora.choices[0].text
    response = _post(server, "/v1/load_lora_adapter", {"lora_name": "l2", "lora_path": "l"})
    assert response.status_code == 400 and "loaded at start only" in response.json()["error"]["message"]
    response = _post(server, "/v1/unload_lora_adapter", {"lora_name": "l"})
    assert response.status_code == 400 and "served merged" in response.json()["error"]["message"]


def test_concurrent_completions_for_two_adapters_and_the_base_equal_each_alone(server):
    prompt = "Hello there"
    ids = server.tokenizer(prompt)["input_ids"]
    jobs = [(name, model) for name, model in (("a", "a"), ("b", "b"), (None, BASE))] * 2
    results = [None] * len(jobs)

    def call(i, model):
        results[i] = server.client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)

    threads = [threading.Thread(target=call, args=(i, model)) for i, (_, model) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for (adapter, model), result in zip(jobs, results):
        assert result.model == model
        assert result.choices[0].text == server.expected(adapter, ids, 12), model
        assert result.usage.prompt_tokens == len(ids)
    assert len({r.choices[0].text for r in results}) == 3  # the three models really differ


def test_chat_streaming_gives_the_non_streamed_answer_piece_by_piece(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    whole = server.client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0)
    chunks = list(server.client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    rendered = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = server.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert whole.choices[0].message.content == server.expected("b", ids, 10)
    assert whole.usage.prompt_tokens == len(ids)


def test_a_stop_string_ends_the_text_before_it(server):
    full = server.client.completions.create(model="a", prompt="Hi", max_tokens=16, temperature=0).choices[0]
    assert full.finish_reason == "length" and len(full.text) >= 6
    stop = full.text[3:5]
    cut = server.client.completions.create(model="a", prompt="Hi", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = server.client.completions.create(model="a", prompt="Hi", max_tokens=16, temperature=0, stop=stop,
                                                stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_sampling_follows_the_request(server):
    texts = {server.client.completions.create(model="a", prompt="Hi", max_tokens=8, temperature=2.0).choices[0].text
             for _ in range(4)}
    assert len(texts) > 1  # sampled at temperature 2, not greedy
    nucleus = server.client.completions.create(model="a", prompt="Hi", max_tokens=8, temperature=1.0, top_p=1e-6)
    assert nucleus.choices[0].text == server.expected("a", server.tokenizer("Hi")["input_ids"], 8)


def test_token_id_prompts_and_ignore_eos_give_exact_lengths(server):
    ids = server.tokenizer("Hello")["input_ids"]
    result = server.client.completions.create(model="b", prompt=ids, max_tokens=9, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 9 and result.usage.prompt_tokens == len(ids)
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].text.startswith(server.expected("b", ids, 9))  # `expected` stops at an eos
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "b", "prompt": [5, 999]}, timeout=10)
    assert response.status_code == 400 and "prompt token ids must lie in [0, 128)" in response.text


@pytest.mark.parametrize("body, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1000}, "max_tokens"),  # past the 256-token context
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 2}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logprobs": 2}, "logprobs"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
])
def test_bad_parameters_are_a_400_naming_the_field(server, body, field):
    payload = {"model": "a", "prompt": "Hi", **body}
    response = httpx.post(f"{server.url}/v1/completions", json=payload, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in error["message"]
    assert error["code"] == 400


def test_unknown_model_and_malformed_bodies(server):
    with pytest.raises(openai.NotFoundError, match=r"The model 'nope' does not exist. Available models: "
                                                   r"\['tiny-base', 'a', 'b', 'l'\]"):
        server.client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=10,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "a", "messages": []}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.chat.completions.create(model="a", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    assert server.health()["status"] == "ok"


def _post(server, path, body):
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_adapters_load_and_unload_while_serving(server):
    post = functools.partial(_post, server)
    with server.client.completions.create(model="a", prompt="Hi", max_tokens=60, temperature=0,
                                          stream=True) as running:
        first = next(iter(running))  # a request for "a" is in the batch

        # Bad loads are refused and change nothing; no answer names a server path.
        bad = server.root / "bad"
        (bad / "corrupt").mkdir(parents=True)
        (bad / "corrupt" / "adapter_config.json").write_text((server.root / "a" / "adapter_config.json").read_text())
        (bad / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
        other = fflora.apply_ffba(make_model("llama", hidden_size=64, intermediate_size=96), fflora.FFBAConfig(r=4))
        fflora.save_adapter(other, bad / "other-shape")
        for name, path, message in [("d", "missing", "could not load adapter 'd' from 'missing': no fflora adapter "
                                                     "at missing"),
                                    ("d", str(bad / "corrupt"), "is truncated or corrupt"),
                                    ("d", "bad/other-shape", "was saved for another base model"),
                                    (BASE, "a", "names the base model")]:
            response = post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
            assert response.status_code == 400, (name, path, response.text)
            assert message in response.json()["error"]["message"], response.text
            assert str(server.root) not in response.text.replace(path, "")
        log = (server.root / "server.log").read_text()  # the server's log says why, too
        assert "adapter 'd' from 'missing' not loaded: no fflora adapter at missing" in log
        response = post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "b"})  # below the adapter root
        assert response.status_code == 200 and response.text == "Success: LoRA adapter 'c' added successfully."
        c = server.client.completions.create(model="c", prompt="Hi", max_tokens=6, temperature=0)
        assert c.choices[0].text == server.expected("b", server.tokenizer("Hi")["input_ids"], 6)

        for name, message in [("e", "bank is full"), ("c", "has already been loaded")]:
            response = post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": "a"})
            assert response.status_code == 400 and message in response.json()["error"]["message"], response.text
        assert [m.id for m in server.client.models.list().data] == [BASE, "a", "b", "c", "l"]

        response = post("/v1/unload_lora_adapter", {"lora_name": "a"})
        assert response.status_code == 200 and response.text == "Success: LoRA adapter 'a' removed successfully."
        assert [m.id for m in server.client.models.list().data] == [BASE, "b", "c", "l"]
        with pytest.raises(openai.NotFoundError, match="Available models: \\['tiny-base', 'b', 'c', 'l'\\]"):
            server.client.completions.create(model="a", prompt="Hi", max_tokens=2)
        assert post("/v1/unload_lora_adapter", {"lora_name": "a"}).status_code == 404
        text = first.choices[0].text + "".join(chunk.choices[0].text for chunk in running)
    assert text == server.expected("a", server.tokenizer("Hi")["input_ids"], 60)  # finished on the unloaded adapter

    # The unloaded adapter's room is free again once its request is done; restore the module's set.
    assert post("/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    assert post("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(server.root / "a")}).status_code == 200
    assert [m.id for m in server.client.models.list().data] == [BASE, "b", "a", "l"]


def test_runtime_loads_stay_below_the_adapter_root(server, tmp_path):
    post = functools.partial(_post, server)
    outside = tmp_path / "outside"
    fflora.save_adapter(fflora.apply_ffba(make_model("llama", max_position_embeddings=256), fflora.FFBAConfig(r=4)),
                        outside)
    (server.root / "link").symlink_to(outside)
    (server.root / "links-inside").mkdir()  # a folder inside the root whose files lead out
    for file in outside.iterdir():
        (server.root / "links-inside" / file.name).symlink_to(file)
    for path in (str(outside), "../" + outside.relative_to(tmp_path.parent).as_posix(), "link", "a/../../x",
                 "links-inside"):
        response = post("/v1/load_lora_adapter", {"lora_name": "d", "lora_path": path})
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == "lora_path" and "outside the folders this server loads adapters from" in error["message"]
        assert str(server.root) not in response.text
    for name in ("x/y", "a" * 129, "bell\x07", " padded", "__base__", BASE):
        response = post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": "a"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "lora_name", (name, response.text)
    assert all("/" not in m.root for m in server.client.models.list().data)
    assert {m.id for m in server.client.models.list().data} == {BASE, "a", "b", "l"}  # nothing loaded


def test_an_adapter_saved_on_other_base_weights_loads_only_when_allowed(server):
    post = functools.partial(_post, server)
    other_base = fflora.apply_ffba(make_model("llama", seed=7, max_position_embeddings=256), fflora.FFBAConfig(r=4))
    fflora.save_adapter(other_base, server.root / "other-base")
    response = post("/v1/load_lora_adapter", {"lora_name": "o", "lora_path": "other-base"})
    assert response.status_code == 400
    assert "a base model with other weights than this one" in response.json()["error"]["message"]
    assert "allow_base_mismatch" in response.json()["error"]["message"]
    response = post("/v1/load_lora_adapter", {"lora_name": "o", "lora_path": "other-base", "allow_base_mismatch": True})
    assert response.status_code == 200, response.text
    assert post("/v1/unload_lora_adapter", {"lora_name": "o"}).status_code == 200


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    body = {"model": "b", "prompt": "Hi", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        events = []
        for line in lines:
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
            if len(events) == 2:
                break
        assert server.health()["running_requests"] == 1
    deadline = time.monotonic() + 30
    while server.health()["running_requests"] or server.health()["scheduled_requests"]:
        assert time.monotonic() < deadline, "the request kept running after its client left"
        time.sleep(0.1)
    assert server.client.completions.create(model="b", prompt="Hi", max_tokens=3, temperature=0).choices[0].text


def test_api_keys_guard_every_route_but_health(tmp_path):
    root = tmp_path
    model = make_model("llama", max_position_embeddings=256)
    model.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    args = ["--model", str(root / "base"), "--served-model-name", BASE, "--max-adapters", "1", "--api-key", "key-one",
            "--api-key", "key-two", "--limit-max-requests", "50", "--log-level", "warning"]
    with ServerProcess(args, root / "server.log", ready_timeout_s=120) as server:  # stopped by its pid
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200  # no key needed
        for route in ("/docs", "/redoc", "/openapi.json"):  # off, key or not
            for headers in ({}, {"Authorization": "Bearer key-one"}):
                assert httpx.get(f"{server.url}{route}", headers=headers, timeout=5).status_code == 404, route
        for key in (None, "key-on", "key-one-and-more", "Bearer"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for method, route, body in (("GET", "/v1/models", None),
                                        ("POST", "/v1/completions", {"model": BASE, "prompt": "ab", "max_tokens": 2}),
                                        ("POST", "/v1/unload_lora_adapter", {"lora_name": "x"})):
                answer = httpx.request(method, f"{server.url}{route}", json=body, headers=headers, timeout=30)
                assert answer.status_code == 401, (key, route)
                assert answer.json()["error"]["type"] == "AuthenticationError"
        for key in ("key-one", "key-two"):
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)
            assert client.models.list().data[0].id == BASE
            assert client.completions.create(model=BASE, prompt="ab", max_tokens=2).choices[0].finish_reason
        with pytest.raises(openai.AuthenticationError, match="Incorrect or missing API key"):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
        # Without --enable-adapter-loading, nobody (not even with a key) loads or unloads at run time.
        for route, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(root / "base")}),
                            ("/v1/unload_lora_adapter", {"lora_name": "x"})):
            answer = httpx.post(f"{server.url}{route}", json=body, headers={"Authorization": "Bearer key-one"}, timeout=30)
            assert answer.status_code == 403 and answer.json()["error"]["type"] == "PermissionDeniedError"
            assert "--enable-adapter-loading" in answer.json()["error"]["message"]


# --- bounded work per request: a second server with small limits ---------------------------------

LIMITS = ["--max-request-bytes", "65536", "--max-queued-requests", "1", "--max-batch-tokens", "8",
          "--header-timeout", "2"]


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    root = tmp_path_factory.mktemp("limited")
    server = Server.__new__(Server)
    server.root, server.tokenizer = root, _tokenizer()
    model = make_model("llama", max_position_embeddings=256)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(root / "base")
    server.tokenizer.save_pretrained(root / "base")
    args = ["--model", str(root / "base"), "--served-model-name", BASE, "--max-adapters", "1",
            "--limit-max-requests", "100", "--log-level", "warning", *LIMITS]
    server.process = ServerProcess(args, root / "server.log", ready_timeout_s=120)
    with server.process:  # stopped by its process id
        server.connect()
        yield server


def test_a_body_over_the_limit_is_a_413_before_it_is_parsed(limited):
    big = {"model": BASE, "prompt": "x" * 70_000}
    response = httpx.post(f"{limited.url}/v1/completions", json=big, timeout=30)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["type"] == "RequestTooLargeError" and "65536 bytes" in response.json()["error"]["message"]
    chunked = httpx.post(f"{limited.url}/v1/completions", content=iter([json.dumps(big).encode()[i:i + 8192]
                                                                       for i in range(0, 70_100, 8192)]), timeout=30)
    assert chunked.status_code == 413
    small = httpx.post(f"{limited.url}/v1/completions", json={"model": BASE, "prompt": "ab", "max_tokens": 2}, timeout=30)
    assert small.status_code == 200


def test_only_the_loopback_host_names_are_answered(limited):
    for host in ("evil.example", "evil.example:80", "127.0.0.2"):
        response = httpx.get(f"{limited.url}/health", headers={"Host": host}, timeout=10)
        assert response.status_code == 400 and "--allowed-host" in response.json()["error"]["message"], host
    for host in (f"localhost:{limited.process.port}", f"127.0.0.1:{limited.process.port}", "[::1]"):
        assert httpx.get(f"{limited.url}/health", headers={"Host": host}, timeout=10).status_code == 200, host


def test_a_connection_that_never_finishes_its_headers_is_closed(limited):
    with socket.create_connection(("127.0.0.1", limited.process.port), timeout=20) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the headers never end
        start = time.monotonic()
        assert conn.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < 10  # --header-timeout 2 (the socket would give up at 20)


def test_a_text_prompt_too_long_for_the_context_is_refused_before_tokenizing(limited):
    with pytest.raises(openai.BadRequestError, match=r"the prompt has 5000 characters, more than fit"):
        limited.client.completions.create(model=BASE, prompt="x" * 5000, max_tokens=2)


def _stream_times(client, prompt, max_tokens, times: list, texts: list):
    """Stream a completion, recording when each piece arrived and its text."""
    with client.completions.create(model=BASE, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True}) as stream:
        for chunk in stream:
            times.append(time.monotonic())
            texts.append(chunk.choices[0].text)


def test_a_long_prompt_beside_a_running_stream_is_prefilled_in_chunks(limited):
    """With 8 tokens per engine step, a 200-token prompt takes many steps to prefill, and the running
    stream gets a token in each of them: it keeps going while the long prompt is read."""
    running_times, running_texts = [], []
    runner = threading.Thread(target=_stream_times, args=(limited.client, [5] * 4, 200, running_times, running_texts))
    runner.start()
    while len(running_times) < 3:
        time.sleep(0.005)
    long_ids = [3 + (7 * i) % 90 for i in range(200)]
    sent = time.monotonic()
    long_times, long_texts = [], []
    _stream_times(limited.client, long_ids, 8, long_times, long_texts)
    runner.join(timeout=120)
    during_prefill = [t for t in running_times if sent < t < long_times[0]]
    assert len(during_prefill) >= 5, (len(during_prefill), len(running_times))
    assert "".join(long_texts) == Server.expected(limited, None, long_ids, 8)
    assert "".join(running_texts) == Server.expected(limited, None, [5] * 4, 200)


def test_beyond_the_waiting_line_a_request_gets_a_429_with_retry_after(limited):
    """Six long prompts at once with room for one waiting request: while the first is prefilled (30 steps
    of 8 tokens) the others find the line full."""
    long_ids = [3 + (5 * i) % 90 for i in range(240)]
    answers = []

    def send():
        answers.append(httpx.post(f"{limited.url}/v1/completions", timeout=120,
                                  json={"model": BASE, "prompt": long_ids, "max_tokens": 2, "temperature": 0}))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "RateLimitError"
    assert "--max-queued-requests 1" in refused.json()["error"]["message"]
    assert limited.health()["waiting_requests"] == 0
    assert limited.client.completions.create(model=BASE, prompt="ab", max_tokens=2).choices[0].text is not None
