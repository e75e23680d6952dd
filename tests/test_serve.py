"""serve.py as a subprocess on a free port, driven by the official `openai` client and by raw HTTP:
answers equal the model's own greedy answers, streaming equals non-streaming, stop strings, n=2,
8 concurrent clients each get their own answer, the API key, every kind of bad request gets an
OpenAI-style 4xx, a client that goes away cancels its request, and the server keeps serving."""

import json
import socket
import threading
import time

import pytest
import torch

from server_process import ServerProcess

KEY = "sk-test-0123456789"
MODEL = "SmolLM2-135M-Instruct"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(default_checkpoint):
    s = ServerProcess("--api_key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def ask(client, content, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 12, **kwargs}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def streamed(client, content, **kwargs):
    """(text per choice, finish reasons, chunks, usage) of a streamed chat completion."""
    chunks = list(ask(client, content, stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, reasons = {}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    return texts, reasons, chunks, chunks[-1].usage


@pytest.fixture(scope="module")
def local(default_checkpoint):
    """The model in this process, for reference answers."""
    from lit_llama.infer.generation import generate
    from lit_llama.infer.load import load_for_inference
    from lit_llama.templates import ChatFormat, get_template

    _, model, tokenizer = load_for_inference(default_checkpoint, "32-true")
    fmt = ChatFormat(get_template("checkpoint", tokenizer), tokenizer)

    def answer(content, max_tokens):
        ids = fmt.prompt_ids([{"role": "user", "content": content}])
        out = list(generate(model, torch.tensor(ids), max_tokens, stop_ids=fmt.stop_ids))
        return ids, out, tokenizer.decode(out)

    return answer


# ---------------------------------------------------------------- with the official client


def test_chat_completion_is_the_models_greedy_answer(client, local):
    r = ask(client, "What is the capital of France?")
    ids, out, text = local("What is the capital of France?", 12)
    assert r.choices[0].message.content == text and "Paris" in text
    assert r.choices[0].message.role == "assistant" and r.model == MODEL and r.object == "chat.completion"
    assert r.choices[0].finish_reason == ("length" if len(out) == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out))
    assert r.usage.total_tokens == len(ids) + len(out)


def test_streaming_equals_the_plain_answer(client):
    plain = ask(client, "Name three colors.", max_tokens=10)
    texts, reasons, chunks, usage = streamed(client, "Name three colors.", max_tokens=10)
    assert texts == {0: plain.choices[0].message.content}
    assert reasons == {0: plain.choices[0].finish_reason}
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # token by token
    assert chunks[0].choices[0].delta.role == "assistant"
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens


def test_stop_strings(client):
    full = ask(client, "Count from one to ten in words.", max_tokens=20).choices[0].message.content
    words = full.split()
    assert len(words) > 4, full
    stop = words[3]
    expected = full[: full.index(stop)]
    r = ask(client, "Count from one to ten in words.", max_tokens=20, stop=[stop, "NEVER-SEEN"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    texts, reasons, _, _ = streamed(client, "Count from one to ten in words.", max_tokens=20, stop=stop)
    assert (texts[0], reasons[0]) == (expected, "stop")


def test_n_choices(client):
    first = ask(client, "Tell me a fact about cats.", max_tokens=8)
    one = first.choices[0].message.content
    r = ask(client, "Tell me a fact about cats.", max_tokens=8, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [one, one]  # greedy: both the same answer
    assert r.usage.completion_tokens == 2 * first.usage.completion_tokens
    assert r.usage.prompt_tokens == first.usage.prompt_tokens  # the prompt counts once
    # sampled with a seed: two different answers, the same ones again for the same seed
    a = ask(client, "Tell me a fact about cats.", max_tokens=8, n=2, temperature=1.0, seed=7)
    b = ask(client, "Tell me a fact about cats.", max_tokens=8, n=2, temperature=1.0, seed=7)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    texts, reasons, _, usage = streamed(client, "Tell me a fact about cats.", max_tokens=8, n=2)
    assert texts == {0: one, 1: one} and set(reasons) == {0, 1}


def test_completions_endpoint(client, server):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    text = r.choices[0].text
    assert text and r.object == "text_completion" and r.usage.completion_tokens <= 8
    echo = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == "The capital of France is" + text
    two = client.completions.create(model=MODEL, prompt=["The capital of France is", "One, two,"], max_tokens=8,
                                    temperature=0)
    assert two.choices[0].text == text and len(two.choices) == 2
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    # OpenAI's default for completions: 16 tokens
    assert client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0).usage.completion_tokens <= 16


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    status, body = server.request("GET", "/health")  # no key needed for the health check
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL


def test_concurrent_clients_each_get_their_own_answer(client, server):
    from openai import OpenAI

    prompts = [f"What is {a} plus {b}?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (10, 3), (4, 4), (6, 1)]]
    prompts[1] = "Name a big animal."
    prompts[5] = "Translate 'thank you' into French."
    sequential = [ask(client, p, max_tokens=8).choices[0].message.content for p in prompts]
    assert len(set(sequential)) >= 6, sequential  # different questions, mostly different answers
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def worker(i):
        try:
            c = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
            barrier.wait()
            if i % 2:  # half of them stream
                results[i] = streamed(c, prompts[i], max_tokens=8)[0][0]
            else:
                results[i] = ask(c, prompts[i], max_tokens=8).choices[0].message.content
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert results == sequential


def test_a_repeated_prefix_comes_from_the_cache_and_metrics(client, server):
    import re

    system = {"role": "system", "content": "You answer in one short sentence. " * 20}
    question = [system, {"role": "user", "content": "What is the capital of Italy?"}]
    first = client.chat.completions.create(model=MODEL, messages=question, max_tokens=8, temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=question, max_tokens=8, temperature=0)
    other = client.chat.completions.create(model=MODEL, messages=[system, {"role": "user", "content": "Name a fruit."}],
                                           max_tokens=8, temperature=0)
    p = first.usage.prompt_tokens
    # the same prompt: all but its last token from the cache, and the same answer
    assert second.usage.prompt_tokens_details.cached_tokens == p - 1
    assert second.choices[0].message.content == first.choices[0].message.content
    # the shared system prompt (about 150 tokens) from the cache
    assert 120 < other.usage.prompt_tokens_details.cached_tokens < other.usage.prompt_tokens
    status, text = server.request("GET", "/metrics")
    assert status == 200
    values = dict(re.findall(r"^lit_llama:(\w+) (\S+)$", text, re.M))
    assert float(values["prompt_tokens_cached_total"]) >= p - 1 + 120
    assert float(values["prefix_cache_hits_total"]) >= 2 and float(values["tokens_predicted_total"]) > 0
    assert "# TYPE lit_llama:requests_processing gauge" in text


# ---------------------------------------------------------------- the API key


def test_api_key_is_required(server):
    from openai import AuthenticationError, OpenAI

    status, body = server.request("POST", "/v1/chat/completions",
                                  {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = server.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and "Incorrect API key" in body["error"]["message"]
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert server.host == "127.0.0.1"  # the default binds to this machine only
    # the web page itself is public (it asks for the key); /health too
    status, page = server.request("GET", "/")
    assert status == 200 and "<title>lit_llama chat</title>" in page


# ---------------------------------------------------------------- bad requests


def chat_body(**kwargs):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}


BAD = [
    ("chat", b"{bad json", 400, "invalid_json"),
    ("chat", b"[1, 2]", 400, "invalid_json"),
    ("chat", b"", 400, "invalid_json"),
    ("chat", chat_body(bogus=1), 400, None),
    ("chat", chat_body(messages=[{"role": "user", "content": "hi", "extra": 1}]), 400, None),
    ("chat", chat_body(max_tokens=0), 400, "invalid_value"),
    ("chat", chat_body(max_tokens=-3), 400, "invalid_value"),
    ("chat", b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e6}' % MODEL.encode(),
     400, "context_length_exceeded"),
    ("chat", chat_body(max_tokens=10 ** 6), 400, "context_length_exceeded"),
    ("chat", chat_body(messages=[{"role": "user", "content": "hello " * 9000}]), 400, "context_length_exceeded"),
    ("chat", chat_body(model="gpt-4"), 404, "model_not_found"),
    ("chat", chat_body(messages=[]), 400, "invalid_value"),
    ("chat", chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400, "invalid_value"),
    ("chat", chat_body(n=0), 400, "invalid_value"),
    ("chat", chat_body(temperature=5), 400, "invalid_value"),
    ("chat", chat_body(top_p=1.5), 400, "invalid_value"),
    ("chat", chat_body(stop=["a", "b", "c", "d", "e"]), 400, None),
    ("chat", chat_body(stop=""), 400, None),
    ("chat", chat_body(max_tokens="many"), 400, "invalid_value"),
    ("chat", chat_body(logprobs=True), 400, "unsupported_value"),
    ("chat", chat_body(tools=[{"type": "function"}]), 400, "unsupported_value"),
    ("completions", {"model": MODEL, "prompt": []}, 400, None),
    ("completions", {"model": MODEL, "prompt": [1, 99999999]}, 400, None),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
    ("completions", {"model": MODEL}, 400, None),
]


@pytest.mark.parametrize("endpoint, body, status, code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_openai_style_errors(server, endpoint, body, status, code):
    got, answer = server.request("POST", f"/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
                                 body, headers=AUTH)
    assert got == status, answer
    error = answer["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code, error


def test_unknown_routes_and_the_server_keeps_serving(server, client):
    status, body = server.request("GET", "/v1/engines", headers=AUTH)
    assert status == 404 and "error" in body
    status, body = server.request("DELETE", "/v1/models", headers=AUTH)
    assert status == 405 and "error" in body
    assert ask(client, "Say hi.", max_tokens=3).choices[0].message.content
    assert server.request("GET", "/health")[1]["failed"] == 0
    assert "Traceback" not in server.log


@pytest.mark.parametrize("args, message", [
    (["--template", "nope"], "unknown chat template 'nope'"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--lora_path", "does/not/exist"], "does/not/exist does not exist"),
    (["--max_queue", "0"], "--max_queue must be at least 1"),
    (["--max_batch_size", "0"], "--max_batch_size must be at least 1"),
    (["--port", "PORT_IN_USE"], "cannot listen on 127.0.0.1"),
])
def test_bad_flags_are_one_clear_line(args, message, server, capsys):
    from test_chat import run_main

    args = [str(server.port) if a == "PORT_IN_USE" else a for a in args]
    code, stderr = run_main("serve.py", args, capsys)
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and message in lines[0] and lines[0].startswith("error:"), stderr


# ---------------------------------------------------------------- clients that go away


def raw_post(server, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=300)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(data)).encode()
              + b"\r\n\r\n" + data)
    return s


def wait_idle(server, timeout=120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = server.request("GET", "/health")[1]
        if not h["busy"] and h["queued"] == 0:
            return h
        time.sleep(0.1)
    raise AssertionError(f"the server is still busy: {h}")


def test_disconnects_cancel_the_request(server, client):
    before = wait_idle(server)
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
            "max_tokens": 2000, "temperature": 0}
    # a streaming client that leaves after a few tokens
    a = raw_post(server, {**long, "stream": True})
    received = b""
    while received.count(b"data: ") < 4:
        received += a.recv(4096)
    # a plain request, batched with it, whose client leaves before its answer is done
    b = raw_post(server, long)
    time.sleep(1.5)
    b.close()
    time.sleep(1.5)
    a.close()
    after = wait_idle(server, timeout=60)
    assert (after["cancelled"] - before["cancelled"], after["served"] - before["served"]) == (2, 0), (before, after)
    # both stopped soon after their clients left, far from their 2000 tokens
    assert after["tokens"] - before["tokens"] < 600, (before, after)
    assert ask(client, "Say hi.", max_tokens=3).choices[0].message.content  # and the next one is served


# ---------------------------------------------------------------- speculative decoding


def test_a_server_with_prompt_lookup_gives_the_same_answers(default_checkpoint, local):
    """--prompt_lookup: greedy answers equal the model's own, streamed and not, while drafted tokens
    are accepted (the /metrics counters)."""
    import re

    from openai import OpenAI

    s = ServerProcess("--prompt_lookup", "true", "--draft_tokens", "4")
    try:
        c = OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=300)
        text = "The keeper lit the lamp at six, wound the clock, and wrote the weather in the log."
        question = f"Repeat the following text exactly:\n\n{text}"
        _, _, want = local(question, 32)
        assert ask(c, question, max_tokens=32).choices[0].message.content == want
        texts, _, _, _ = streamed(c, question, max_tokens=32)
        assert texts[0] == want
        values = dict(re.findall(r"^lit_llama:(\w+) (\S+)$", s.request("GET", "/metrics")[1], re.M))
        assert float(values["draft_tokens_accepted_total"]) > 0.3 * float(values["draft_tokens_total"]) > 0, values
    finally:
        s.stop()
