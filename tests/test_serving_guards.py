"""The serving layer's guards on their own: names, adapter roots, the waiting line, the Host parser,
the server settings and their memory estimate."""


import os
import signal
import time

import pytest
from conftest import make_model

import fflora
from fflora.serving.adapter_policy import MAX_NAME_LENGTH, AdapterRoots, adapter_name_problem
from fflora.serving.admission import Admission, Overloaded
from fflora.serving.api_server import bank_room, listening_socket, run_server
from fflora.serving.config import SLOT_LEN_CAP, ServerConfig
from fflora.serving.memory import describe_memory, memory_estimate
from fflora.serving.http_guards import host_of


@pytest.mark.parametrize("name", ["a", "math-v2", "ünïcode name", "x" * MAX_NAME_LENGTH])
def test_good_adapter_names_pass(name):
    assert adapter_name_problem(name, "base") is None


@pytest.mark.parametrize("name, problem", [("", "1 to 128"), ("x" * (MAX_NAME_LENGTH + 1), "1 to 128"),
                                           ("a/b", "'/'"), ("a\\b", "'/'"), ("tab\there", "control"),
                                           (" x", "whitespace"), ("base", "names the base model"),
                                           ("__base__", "names the base model")])
def test_bad_adapter_names_say_what_is_wrong(name, problem):
    assert problem in adapter_name_problem(name, "base")


def test_adapter_roots_resolve_inside_and_refuse_escapes(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (outside / "adapter_model.safetensors").write_bytes(b"")
    (root / "b" / "adapter").mkdir(parents=True)  # a run folder whose adapter's weights lead out
    (root / "b" / "adapter" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (root / "c").mkdir()  # a folder whose file links stay inside
    (root / "c" / "adapter_model.safetensors").symlink_to(root / "a")
    roots = AdapterRoots(enabled=True, roots=[root])
    assert roots.resolve("a") == (root / "a").resolve()
    assert roots.resolve("c") == (root / "c").resolve()
    assert roots.resolve(str(root / "a")) == (root / "a").resolve()
    assert roots.resolve("not-yet") == (root / "not-yet").resolve()  # inside: the load then says it is missing
    for given in ("../outside", str(outside), "link", "a/../../outside", "b"):
        with pytest.raises(ValueError, match="outside the folders this server loads adapters from") as e:
            roots.resolve(given)
        assert str(tmp_path) not in str(e.value).replace(given, "")
    message = f"no fflora adapter at {root.resolve() / 'a'}: missing; see {root.resolve()}"
    assert roots.without_paths(message, (root / "a").resolve(), "a") == "no fflora adapter at a: missing; see <adapter-root>"


def test_adapter_loading_needs_a_root_that_exists(tmp_path):
    with pytest.raises(ValueError, match="--enable-adapter-loading needs at least one --adapter-root"):
        AdapterRoots(enabled=True, roots=[])
    with pytest.raises(ValueError, match="is not a folder"):
        AdapterRoots(enabled=True, roots=[tmp_path / "nope"])
    assert not AdapterRoots(enabled=False, roots=[]).enabled


def test_the_waiting_line_bounds_requests_and_tokens():
    line = Admission(max_requests=2, max_tokens=100)
    first = line.admit(60)
    with pytest.raises(Overloaded, match="60 prompt tokens are waiting"):
        line.admit(50)
    second = line.admit(40)
    with pytest.raises(Overloaded, match="2 requests are waiting"):
        line.admit(1)
    first.started()
    first.started()  # once only
    assert (line.requests, line.tokens) == (1, 40)
    second.started()
    assert line.admit(500)  # alone, a request longer than the token bound is still admitted


@pytest.mark.parametrize("header, host", [("127.0.0.1:8000", "127.0.0.1"), ("LocalHost", "localhost"),
                                          ("[::1]:8000", "::1"), ("[::1]", "::1"), ("::1", "::1"),
                                          ("example.com:443", "example.com")])
def test_host_of_a_host_header(header, host):
    assert host_of(header) == host


def test_server_settings_are_checked_before_anything_loads():
    with pytest.raises(ValueError, match="--max-queued-requests must be >= 1"):
        ServerConfig(max_queued_requests=0)
    with pytest.raises(ValueError, match="--header-timeout must be > 0"):
        ServerConfig(header_timeout_s=0)
    with pytest.raises(ValueError, match="--api-key must not be empty"):
        ServerConfig(api_keys=[" "])
    with pytest.raises(ValueError, match="--adapter 'a/b': an adapter name has no '/'"):
        run_server(ServerConfig(adapters={"a/b": "x"}))  # before the model loads
    assert ServerConfig().hosts() == ["127.0.0.1", "localhost", "::1"]
    assert ServerConfig(host="0.0.0.0").hosts() is None
    assert ServerConfig(host="0.0.0.0", allowed_hosts=["api.example"]).hosts() == ["api.example"]


def test_the_memory_estimate_counts_weights_cache_and_a_step():
    model = fflora.fuse(make_model("llama"), max_adapters=2)
    cfg = ServerConfig(max_num_seqs=3, max_model_len=100, max_batch_tokens=64)
    estimate = memory_estimate(model, cfg)
    c = model.config
    kv_heads, head_dim = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    assert estimate["kv_cache"] == 3 * 100 * c.num_hidden_layers * 2 * kv_heads * head_dim * 4  # 3 slots, fp32
    unique = {t.data_ptr(): t.numel() * 4 for t in [*model.parameters(), *model.buffers()]}
    assert estimate["weights"] == sum(unique.values())
    assert estimate["step"] == 64 * (c.vocab_size * 4 + 3 * c.intermediate_size * 4)
    assert estimate["total"] == estimate["weights"] + estimate["kv_cache"] + estimate["step"]  # runtime 0 here
    assert memory_estimate(model, cfg, runtime=10)["total"] == estimate["total"] + 10
    with_lora = memory_estimate(model, cfg, merged=[model])  # a merged LoRA: weights, a cache and a step of its own
    assert [with_lora[k] for k in ("weights", "kv_cache", "step")] == [2 * estimate[k] for k in ("weights", "kv_cache", "step")]
    assert "3 slots x 100 positions, --max-num-seqs x --max-model-len" in describe_memory(estimate, cfg, model)
    default = memory_estimate(model, ServerConfig())  # 8 slots of the model's positions
    assert default["kv_cache"] == 8 * min(c.max_position_embeddings, SLOT_LEN_CAP) * c.num_hidden_layers * 2 * kv_heads * head_dim * 4
    with pytest.raises(ValueError, match="--max-num-seqs must be >= 1, got 0"):
        ServerConfig(max_num_seqs=0)


def _server_parts(**config):
    """A tiny engine, its serving layer and a `DrainingServer` over them, as `run_server` builds them."""
    from types import SimpleNamespace

    import uvicorn

    from fflora.serving.api_server import DrainingServer, build_app
    from fflora.serving.openai_serving import OpenAIServing
    from fflora.serving.slot_engine import SlotEngine

    engine = SlotEngine(fflora.FusedModel.build(make_model("llama"), max_adapters=1), slots=1, max_len=32,
                        gemm_plan="standard")
    serving = OpenAIServing(engine, SimpleNamespace(get_vocab=lambda: {"a": 0}), model_name="base", max_model_len=32)
    server = DrainingServer(uvicorn.Config(build_app(serving), log_level="warning", **config), serving,
                            shutdown_timeout_s=1)
    return engine, server


@pytest.fixture
def signal_handlers():
    """SIGINT's and SIGTERM's handlers as they were before the test, restored after it."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield handlers
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_a_failed_engine_step_stops_the_server_with_the_reason(monkeypatch, signal_handlers):
    """`fflora serve`'s form (HTTP in a thread, the engine in this one): a step that fails ends both, and
    the reason is raised (the process exits non-zero), instead of a server left answering 503."""
    from fflora.serving.api_server import serve_in_main_thread

    engine, server = _server_parts()

    def failing_step():
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "_step", failing_step)
    started = time.monotonic()
    with listening_socket("127.0.0.1", 0) as sock, pytest.raises(RuntimeError, match="the engine stopped: RuntimeError: boom"):
        serve_in_main_thread(engine, [], server, sock, begun=started)
    assert not engine.is_running() and time.monotonic() - started < 30
    assert signal.getsignal(signal.SIGTERM) == server.handle_exit  # the drain's, once the engine was ready


def test_ctrl_c_while_the_server_starts_ends_the_start(monkeypatch, signal_handlers):
    """Before the engine is ready (its GEMM plan and compiled warm-up take minutes on a real model)
    SIGINT keeps Python's handler: the start ends at once, nothing was served, no drain is waited for."""
    from fflora.serving.api_server import serve_in_main_thread

    engine, server = _server_parts()

    def interrupted_warm_up():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal's handler runs here, at once
        raise AssertionError("SIGINT did not end the start")

    monkeypatch.setattr(engine, "_warm_up", interrupted_warm_up)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with listening_socket("127.0.0.1", 0) as sock, pytest.raises(KeyboardInterrupt):
        serve_in_main_thread(engine, [], server, sock, begun=time.monotonic())
    assert not server.started and signal.getsignal(signal.SIGTERM) == signal_handlers[signal.SIGTERM]


def test_a_port_in_use_fails_before_the_model_loads(monkeypatch):
    import fflora.serving.api_server as api_server

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the port was checked")

    monkeypatch.setattr(api_server, "load_base_model", no_load)
    with listening_socket("127.0.0.1", 0) as held:
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ValueError, match=rf"cannot serve on 127.0.0.1:{port}: Address already in use; "
                                             "choose another --port or --host"):
            run_server(ServerConfig(port=port))
    with pytest.raises(ValueError, match="cannot serve on 203.0.113.7:8000: .*choose another --port or --host"):
        run_server(ServerConfig(host="203.0.113.7"))  # an address this machine does not have
    with pytest.raises(ValueError, match="--port must be between 0 and 65535"):
        ServerConfig(port=-1)


def test_an_adapter_folder_without_an_adapter_fails_before_the_model_loads(monkeypatch, tmp_path):
    import fflora.serving.api_server as api_server

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the adapters were read")

    monkeypatch.setattr(api_server, "load_base_model", no_load)
    for settings in ({}, {"rank_budget": 32}):  # whether or not the bank's room is taken from the adapters
        with pytest.raises(FileNotFoundError, match=f"no fflora adapter at {tmp_path}: adapter_config.json is missing"):
            run_server(ServerConfig(adapters={"a": str(tmp_path)}, port=0, **settings))


def test_the_bank_room_is_what_the_start_adapters_take_unless_adapters_can_load_later(tmp_path):
    for name, config in (("a", fflora.FFBAConfig(r=4, alpha=8)), ("b", fflora.FFBAConfig(r=6, alpha=6, forward=False))):
        fflora.save_adapter(fflora.apply_ffba(make_model("llama"), config), tmp_path / name)
    adapters = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b"), "l": str(tmp_path / "lora")}
    assert bank_room(ServerConfig(adapters=adapters), loras=["l"]) == 16  # ba.*: 4 + 6, rounded up (the LoRA is merged, apart)
    assert bank_room(ServerConfig(adapters=adapters, rank_budget=32), loras=["l"]) == 32  # --rank-budget says
    assert bank_room(ServerConfig(adapters=adapters, enable_adapter_loading=True, adapter_roots=[str(tmp_path)]),
                     loras=["l"]) is None  # the default room: adapters may load at run time
    assert bank_room(ServerConfig(), loras=[]) == 8  # the base model alone: the least room
