"""The openai backend against a real OpenAI-compatible server (chatserver) on
127.0.0.1 serving the builtin model: equality with hf, n, the request cache, the API key,
retries, a server that is down, the concurrency bound."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from engine.models.backends import SamplingParams
from engine.models.backends.openai import OpenAIBackend
from engine.models.backends.requests import BackendError

from chatserver import ChatServer

ROOT = Path(__file__).resolve().parents[2]
MODEL = "builtin:tiny-chat"
PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a much longer question about the tides and the moon"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}],
]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingParams(n=3, temperature=1.0, max_new_tokens=8)


def no_sleep(_: float) -> None:
    pass


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from engine.models.backends.hf import HFBackend
    from engine.models.weights import load_model

    model, tok = load_model(MODEL, cache_root=tmp_path_factory.mktemp("models"))
    return HFBackend(model, tok, batch_size=4)


@pytest.fixture
def serve(hf):
    """serve(**ChatServer kwargs) -> a started server, stopped after the test."""
    started = []

    def start(**kw) -> ChatServer:
        server = ChatServer(hf, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def client(server: ChatServer, **kw) -> OpenAIBackend:
    kw.setdefault("sleep", no_sleep)
    return OpenAIBackend(server.url, MODEL, **kw)


def texts(results):
    return [[c.text for c in comps] for comps in results]


def test_greedy_equals_hf(hf, serve):
    server = serve()
    got = client(server).generate(PROMPTS, GREEDY, seed=0)
    want = hf.generate(PROMPTS, GREEDY, seed=0)
    assert [[(c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in x] for x in got] == [
        [(c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) for c in x] for x in want
    ]
    assert server.requests == len(PROMPTS)


def test_n_samples_one_request_per_prompt_and_seeded(serve):
    server = serve()
    backend = client(server)
    a = backend.generate(PROMPTS, SAMPLED, seed=5)
    assert all(len(x) == 3 for x in a) and server.requests == len(PROMPTS)
    assert texts(backend.generate(PROMPTS, SAMPLED, seed=5)) == texts(a)
    assert texts(backend.generate(PROMPTS, SAMPLED, seed=6)) != texts(a)
    # seed of prompt i is seed + i: the order requests run in does not matter
    serial = client(server, max_concurrency=1).generate(PROMPTS, SAMPLED, seed=5)
    assert texts(serial) == texts(a)


def test_fewer_choices_than_n_get_follow_up_requests(serve):
    server = serve(max_n=2)
    out = client(server).generate(PROMPTS[:1], SamplingParams(n=5, temperature=1.0, max_new_tokens=8), seed=1)
    assert len(out[0]) == 5
    assert server.requests == 3  # 2 + 2 + 1


def test_cache_second_call_and_fresh_backend_send_nothing(serve, tmp_path):
    server = serve()
    cache = tmp_path / "requests"
    first = client(server, cache_dir=cache).generate(PROMPTS, SAMPLED, seed=3)
    assert server.requests == len(PROMPTS) and len(list(cache.glob("*.json"))) == len(PROMPTS)
    backend = client(server, cache_dir=cache)
    assert texts(backend.generate(PROMPTS, SAMPLED, seed=3)) == texts(first)
    assert server.requests == len(PROMPTS) and backend.http_requests == 0
    assert texts(client(server, cache_dir=cache).generate(PROMPTS, SAMPLED, seed=3)) == texts(first)
    assert server.requests == len(PROMPTS)
    assert not [p for p in cache.iterdir() if p.suffix != ".json"]  # no temp files left behind


def test_cache_resumes_request_by_request(serve, tmp_path):
    server = serve()
    cache = tmp_path / "requests"
    client(server, cache_dir=cache).generate(PROMPTS[:2], GREEDY, seed=0)  # "killed" after two prompts
    assert server.requests == 2
    client(server, cache_dir=cache).generate(PROMPTS, GREEDY, seed=0)
    assert server.requests == 3  # only the missing one
    # a torn cache file is asked again and rewritten
    victim = next(cache.glob("*.json"))
    victim.write_text("{not json")
    client(server, cache_dir=cache).generate(PROMPTS, GREEDY, seed=0)
    assert server.requests == 4 and json.loads(victim.read_text())["response"]["choices"]


def test_api_key_from_env_is_sent_and_never_cached(serve, tmp_path, monkeypatch):
    secret = "sk-test-0123456789-secret"
    server = serve(api_key=secret)
    cache = tmp_path / "requests"
    monkeypatch.setenv("TEST_OPENAI_KEY", secret)
    out = client(server, api_key_env="TEST_OPENAI_KEY", cache_dir=cache).generate(PROMPTS, GREEDY, seed=0)
    assert len(out) == len(PROMPTS)
    files = list(cache.iterdir())
    assert files and not any(secret.encode() in f.read_bytes() for f in files)
    assert not any(secret in f.name for f in files)

    monkeypatch.setenv("TEST_OPENAI_KEY", "sk-wrong")
    with pytest.raises(BackendError) as err:
        client(server, api_key_env="TEST_OPENAI_KEY").generate(PROMPTS[:1], GREEDY, seed=9)
    msg = str(err.value)
    assert "401" in msg and "TEST_OPENAI_KEY" in msg and server.url in msg and "\n" not in msg
    assert "sk-wrong" not in msg
    before = server.requests
    with pytest.raises(BackendError, match="401"):  # no key at all; 4xx: no retries
        client(server).generate(PROMPTS[:1], GREEDY, seed=9)
    assert server.requests == before + 1

    monkeypatch.delenv("TEST_OPENAI_KEY")
    with pytest.raises(BackendError, match="TEST_OPENAI_KEY.*not set"):
        client(server, api_key_env="TEST_OPENAI_KEY").generate(PROMPTS[:1], GREEDY, seed=9)


@pytest.mark.parametrize("status", [429, 503])
def test_retries_then_succeeds(serve, status):
    server = serve(fail_first=2, fail_status=status)
    sleeps: list[float] = []
    out = client(server, sleep=sleeps.append).generate(PROMPTS[:1], GREEDY, seed=0)
    assert len(out[0]) == 1 and server.requests == 3
    assert len(sleeps) == 2 and all(0 <= s <= 8 for s in sleeps)


def test_backoff_is_exponential_jittered_and_capped(serve):
    server = serve(fail_first=100)
    sleeps: list[float] = []
    with pytest.raises(BackendError) as err:
        client(server, sleep=sleeps.append, max_retries=6).generate(PROMPTS[:1], GREEDY, seed=0)
    assert server.requests == 7 and "429" in str(err.value) and "7 attempts" in str(err.value)
    assert len(sleeps) == 6
    for attempt, s in enumerate(sleeps):
        full = min(8.0, 0.5 * 2**attempt)
        assert full / 2 <= s <= full


def test_other_4xx_fail_at_once(serve):
    server = serve(model_name="served-name")
    with pytest.raises(BackendError, match="404.*base_url"):
        client(server).generate(PROMPTS[:1], GREEDY, seed=0)
    assert server.requests == 1


def test_server_down_fails_quickly_with_a_hint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    start = time.monotonic()
    with pytest.raises(BackendError) as err:
        OpenAIBackend(url, MODEL, sleep=no_sleep).generate(PROMPTS, GREEDY, seed=0)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert url in msg and "refused" in msg and "server running" in msg and "\n" not in msg


def test_timeout_is_retried_then_reported(serve):
    server = serve(delay_s=0.4)
    with pytest.raises(BackendError, match="timeout_s"):
        client(server, timeout_s=0.1, max_retries=1).generate(PROMPTS[:1], GREEDY, seed=0)
    assert server.requests == 2


def test_concurrency_bound(serve):
    server = serve(delay_s=0.3)
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
    client(server, max_concurrency=2).generate(prompts, GREEDY, seed=0)
    assert server.requests == 8 and server.max_in_flight == 2


def test_server_http_api(serve):
    server = serve(api_key="k1", model_name=MODEL)
    auth = {"Authorization": "Bearer k1"}
    with urllib.request.urlopen(urllib.request.Request(server.url + "/models", headers=auth)) as r:
        assert json.load(r)["data"][0]["id"] == MODEL
    body = {
        "model": MODEL,
        "messages": PROMPTS[0],
        "n": 2,
        "temperature": 0.8,
        "max_tokens": 5,
        "seed": 1,
        "stop": ["zz"],
    }
    req = urllib.request.Request(
        server.url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={**auth, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        resp = json.load(r)
    assert resp["object"] == "chat.completion" and resp["model"] == MODEL
    assert [c["index"] for c in resp["choices"]] == [0, 1]
    for c in resp["choices"]:
        assert c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length")
    u = resp["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["prompt_tokens"] > 0
    for headers, status in (({"Authorization": "Bearer nope"}, 401), (auth, 400)):
        data = json.dumps(body).encode() if status == 401 else b'{"messages": []}'
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(server.url + "/chat/completions", data=data, headers=headers))
        assert err.value.code == status and "message" in json.load(err.value)["error"]


def test_modules_import_without_torch():
    code = (
        "import sys, engine.models.backends.openai, chatserver; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=60)
