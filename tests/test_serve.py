"""The HTTP server: API shape, validation, streaming, concurrency, disconnects and shutdown.

In-process tests use Starlette's TestClient; live tests run uvicorn on 127.0.0.1 (a free port) in a
background thread, stopped at the end of each test. The model is `serve_fakes.FakeLanguageModel`
(deterministic text) or, when `tinystories.generate` exists, a tiny random-weight model.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra (starlette) is not installed")
pytest.importorskip("uvicorn", reason="the 'serve' extra (uvicorn) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (dev extra)")

from serve_fakes import CRASH_PROMPT, FAIL_PROMPT, FakeLanguageModel, expected_pieces  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from tinystories.errors import UserError  # noqa: E402
from tinystories.serve import BackgroundServer, bind_socket, create_app  # noqa: E402

MODEL = "fake-tiny"
LIMIT = 64


@pytest.fixture
def fake() -> FakeLanguageModel:
    return FakeLanguageModel()


@pytest.fixture
def client(fake):
    with TestClient(create_app(fake, MODEL, max_tokens_limit=LIMIT, max_body_bytes=4096)) as test_client:
        yield test_client


def post(client, body, **kwargs):
    return client.post("/v1/completions", json=body, **kwargs)


def sse_payloads(text: str) -> list[str]:
    """The data payloads of a server-sent-events body, checking its framing."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: "):] for event in events]


def assert_openai_error(response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


# ----------------------------------------------------------------------------------------------
# Endpoints


def test_health_models_and_page(client):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": MODEL, "max_tokens_limit": LIMIT, "pending": 0}

    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [(MODEL, "model", "tinystories")]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_openai_error(client.get("/v1/models/gpt-4"), 404, "model", "model_not_found")

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]  # the browser may load nothing else
    html = page.text
    for needle in ('id="prompt"', 'id="temperature"', 'id="top_k"', 'id="top_p"', 'id="max_tokens"',
                   'id="generate"', "/v1/completions", "getReader", "tokens/s"):
        assert needle in html
    for external in ("http://", "https://", "<script src", "<link rel=\"stylesheet\""):
        assert external not in html  # self-contained: works offline


def test_completion_matches_the_model(client, fake):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
            "top_k": 20, "repetition_penalty": 1.1, "seed": 7}
    before = int(time.time())
    response = post(client, body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) == {"id", "object", "created", "model", "choices", "usage"}
    assert result["id"].startswith("cmpl-") and result["object"] == "text_completion" and result["model"] == MODEL
    assert before <= result["created"] <= time.time()
    text = "".join(expected_pieces("Once upon a time", 7, 5))
    assert result["choices"] == [{"text": text, "index": 0, "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len("Once upon a time".encode())
    assert result["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5}
    # The request's fields reach generate under the interface's names, unchanged.
    assert fake.calls == [("generate", "Once upon a time",
                           {"max_new_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 20,
                            "repetition_penalty": 1.1, "seed": 7, "stop": ()})]


def test_defaults_are_openais(client, fake):
    result = post(client, {"prompt": "Hi"}).json()  # `model` may be left out: there is one
    assert fake.calls[0][2] == {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                "repetition_penalty": 1.0, "seed": None, "stop": ()}
    assert result["usage"]["completion_tokens"] == 16


def test_prompt_list_and_n_are_batched_in_one_call(client, fake):
    result = post(client, {"prompt": ["Tom", "Lily went"], "n": 2, "max_tokens": 3, "seed": 1}).json()
    assert len(fake.calls) == 1 and fake.calls[0][:2] == ("generate", ["Tom", "Lily went"])
    expected = [(p, "".join(expected_pieces(p, 1 + s, 3))) for p in ("Tom", "Lily went") for s in range(2)]
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in result["choices"]] == [text for _, text in expected]
    assert result["choices"][0]["text"] != result["choices"][1]["text"]  # n samples differ
    assert result["usage"]["prompt_tokens"] == len("Tom") + len("Lily went")  # each prompt counted once
    assert result["usage"]["completion_tokens"] == 12


def test_stop_sequences_and_echo(client):
    # From seed 0 and a 3-character prompt the pieces are " ran to the park. He ..."
    result = post(client, {"prompt": "abc", "max_tokens": 10, "seed": 0, "stop": [" park", "zzz"]}).json()
    assert result["choices"][0]["text"] == " ran to the"
    assert result["choices"][0]["finish_reason"] == "stop"
    result = post(client, {"prompt": "abc", "max_tokens": 2, "seed": 0, "stop": ".", "echo": True}).json()
    assert result["choices"][0]["text"] == "abc ran to"


def test_streaming_matches_the_plain_completion(client, fake):
    body = {"prompt": "The cat", "max_tokens": 6, "seed": 3, "temperature": 0.7}
    plain = post(client, body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(response.read().decode())
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    assert len(events) == 6  # one event per token
    assert all(e["object"] == "text_completion" and e["model"] == MODEL for e in events)
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("cmpl-")
    assert "".join(e["choices"][0]["text"] for e in events) == plain["text"]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 5 + ["length"]
    assert fake.calls[-1] == ("stream", "The cat", fake.calls[0][2])


def test_streaming_usage_and_several_choices(client):
    body = {"prompt": ["ab", "abcd"], "n": 2, "max_tokens": 2, "seed": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    payloads = sse_payloads(post(client, body).text)
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    usage_event = events[-1]
    assert usage_event["choices"] == []
    assert usage_event["usage"] == {"prompt_tokens": 6, "completion_tokens": 8, "total_tokens": 14}
    texts: dict[int, str] = {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    # Streamed choices run one after another; sample j of a prompt uses seed + j.
    assert texts == {0: "".join(expected_pieces("ab", 5, 2)), 1: "".join(expected_pieces("ab", 6, 2)),
                     2: "".join(expected_pieces("abcd", 5, 2)), 3: "".join(expected_pieces("abcd", 6, 2))}


# ----------------------------------------------------------------------------------------------
# Refusals: every bad input is a 4xx in OpenAI's shape and never reaches the model

BAD_REQUESTS = [
    ({"prompt": "x", "max_tokens": LIMIT + 1}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens", "invalid_type"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens", "invalid_type"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens", "invalid_type"),
    ({"prompt": "x", "temperature": -0.1}, "temperature", "invalid_value"),
    ({"prompt": "x", "temperature": 2.5}, "temperature", "invalid_value"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "invalid_type"),
    ({"prompt": "x", "top_p": 0}, "top_p", "invalid_value"),
    ({"prompt": "x", "top_p": 1.01}, "top_p", "invalid_value"),
    ({"prompt": "x", "top_k": -1}, "top_k", "invalid_value"),
    ({"prompt": "x", "top_k": 2.5}, "top_k", "invalid_type"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
    ({"prompt": "x", "repetition_penalty": [1]}, "repetition_penalty", "invalid_type"),
    ({"prompt": "x", "n": 0}, "n", "invalid_value"),
    ({"prompt": "x", "n": 17}, "n", "invalid_value"),
    ({"prompt": ["a", "b", "c"], "n": 6}, "n", "invalid_value"),
    ({"prompt": "x", "n": "2"}, "n", "invalid_type"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"prompt": "x", "stop": [1]}, "stop", "invalid_type"),
    ({"prompt": "x", "stop": ""}, "stop", "invalid_value"),
    ({"prompt": "x", "seed": -1}, "seed", "invalid_value"),
    ({"prompt": "x", "seed": "x"}, "seed", "invalid_type"),
    ({"prompt": "x", "stream": "yes"}, "stream", "invalid_type"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"prompt": "x", "stream": True, "stream_options": {"other": 1}}, "stream_options", "invalid_type"),
    ({"prompt": "x", "echo": 1}, "echo", "invalid_type"),
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": None}, "prompt", "missing_required_parameter"),
    ({"prompt": 5}, "prompt", "invalid_type"),
    ({"prompt": []}, "prompt", "invalid_type"),
    ({"prompt": ["a", 1]}, "prompt", "invalid_type"),
    ({"prompt": [1, 2, 3]}, "prompt", "unsupported_value"),
    ({"prompt": ["x"] * 17}, "prompt", "invalid_value"),
    ({"prompt": "x", "logprobs": 1}, "logprobs", "unsupported_parameter"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "unsupported_parameter"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"prompt": "x", "logit_bias": {"1": 2}}, "logit_bias", "unsupported_parameter"),
    ({"prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter"),
    ({"prompt": "x", "model": 3}, "model", "invalid_type"),
    ({"prompt": "x", "temprature": 1}, "temprature", "unknown_parameter"),
]


@pytest.mark.parametrize("body,param,code", BAD_REQUESTS, ids=[f"{p}-{c}-{i}" for i, (_, p, c) in enumerate(BAD_REQUESTS)])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_parameters_are_400(client, fake, body, param, code, stream):
    if stream and "stream" not in body and "stream_options" not in body:
        body = dict(body, stream=True)
    assert_openai_error(post(client, body), 400, param, code)
    assert fake.calls == []


def test_neutral_openai_fields_are_accepted(client):
    body = {"prompt": "x", "max_tokens": 1, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}, "best_of": 1, "user": "someone", "suffix": None, "stop": None, "seed": None}
    assert post(client, body).status_code == 200


def test_unknown_model_is_404(client, fake):
    assert_openai_error(post(client, {"model": "gpt-4", "prompt": "x"}), 404, "model", "model_not_found")
    assert fake.calls == []


@pytest.mark.parametrize("content", [b"{", b'{"prompt": "x",}', b"\xff\xfe", b'{"prompt": "x", "temperature": NaN}',
                                     b'{"prompt": "x", "top_p": Infinity}', b"[" * 1500 + b"]" * 1500, b"",
                                     b'["prompt"]', b'"prompt"', b"null"])
def test_malformed_json_is_400(client, fake, content):
    response = client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, None)
    assert fake.calls == []


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
def test_wrong_content_type_is_415(client, fake, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/completions", content=b'{"prompt": "x"}', headers=headers)
    assert_openai_error(response, 415, None, "unsupported_media_type")
    assert fake.calls == []


def test_json_with_charset_is_accepted(client):
    response = client.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": 1}',
                           headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200


def test_oversized_bodies_are_413(client, fake):
    big = {"prompt": "x" * 5000}  # the test app allows 4096 bytes
    assert_openai_error(post(client, big), 413, None, "request_too_large")

    def chunks():  # no Content-Length: the body arrives chunked and is counted as it comes
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    response = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_openai_error(response, 413, None, "request_too_large")
    assert fake.calls == []


def test_unknown_urls_methods_and_chat_are_openai_errors(client):
    error = assert_openai_error(client.post("/v1/chat/completions", json={"messages": []}), 404, None, "unknown_url")
    assert "/v1/completions" in error["message"]
    assert_openai_error(client.get("/v1/nothing"), 404, None, "unknown_url")
    assert_openai_error(client.get("/v1/completions"), 405, None, "method_not_allowed")
    assert_openai_error(client.post("/health"), 405, None, "method_not_allowed")


def test_model_refusal_is_400_and_a_crash_is_a_json_500(fake):
    app = create_app(fake, MODEL, max_tokens_limit=LIMIT)
    with TestClient(app, raise_server_exceptions=False) as client:
        for stream in (False, True):
            error = assert_openai_error(post(client, {"prompt": FAIL_PROMPT, "stream": stream}), 400, None)
            assert "refused by the model" in error["message"]
            crash = post(client, {"prompt": CRASH_PROMPT, "stream": stream})
            assert crash.status_code == 500
            assert crash.json()["error"]["type"] == "server_error"
            assert "simulated bug" not in crash.text  # internals stay in the server log
        # Once events have been sent, a later failure is reported in-band and the stream ends.
        payloads = sse_payloads(post(client, {"prompt": ["fine", CRASH_PROMPT], "max_tokens": 2, "stream": True}).text)
        assert [json.loads(p)["choices"][0]["index"] for p in payloads[:2]] == [0, 0]
        assert json.loads(payloads[2])["error"]["message"] == "the model failed while generating"
        assert len(payloads) == 3  # no [DONE]: the stream did not complete
        assert client.get("/health").json()["pending"] == 0  # every refused request gave back its slot


def test_limits_are_checked_when_the_app_is_made(fake):
    with pytest.raises(UserError, match="max-tokens-limit"):
        create_app(fake, MODEL, max_tokens_limit=0)


# ----------------------------------------------------------------------------------------------
# A live server on loopback: real clients, concurrency, disconnects, shutdown


def test_openai_client_plain_and_streamed(fake):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")
    with BackgroundServer(create_app(fake, MODEL, max_tokens_limit=LIMIT)) as server:
        assert server.url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)
        assert [model.id for model in client.models.list()] == [MODEL]

        completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7, seed=11,
                                               temperature=0.8, extra_body={"top_k": 40})
        expected = "".join(expected_pieces("Once upon a time", 11, 7))
        assert completion.choices[0].text == expected
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 7
        assert fake.calls[-1][2]["top_k"] == 40

        stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7, seed=11,
                                           temperature=0.8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].usage.completion_tokens == 7

        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="x", max_tokens=LIMIT + 1)
        assert refused.value.body["param"] == "max_tokens"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_concurrent_clients_are_queued_and_the_loop_stays_free():
    fake = FakeLanguageModel(delay=0.01)  # 10 tokens: ~0.1 s per request
    with BackgroundServer(create_app(fake, MODEL, max_tokens_limit=LIMIT)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        results: dict[int, dict] = {}

        def request(i: int) -> None:
            body = {"prompt": f"p{i}", "max_tokens": 10, "seed": i, "stream": i % 2 == 1}
            response = http.post("/v1/completions", json=body)
            results[i] = {"status": response.status_code, "text": response.text}

        threads = [threading.Thread(target=request, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: http.get("/health").json()["pending"] >= 2)
        # While the model is busy with queued work, the event loop still answers at once.
        started = time.perf_counter()
        assert http.get("/health").status_code == 200
        assert time.perf_counter() - started < 0.5
        for thread in threads:
            thread.join(30)
    assert all(r["status"] == 200 for r in results.values()) and len(results) == 8
    for i, result in results.items():
        expected = "".join(expected_pieces(f"p{i}", i, 10))
        if i % 2:
            events = [json.loads(p) for p in sse_payloads(result["text"])[:-1]]
            assert "".join(e["choices"][0]["text"] for e in events) == expected
        else:
            assert json.loads(result["text"])["choices"][0]["text"] == expected
    assert fake.overlaps == 0  # one model call at a time


def test_client_disconnect_stops_its_stream():
    fake = FakeLanguageModel(delay=0.01)  # 1000 tokens would take 10 s
    with BackgroundServer(create_app(fake, MODEL, max_tokens_limit=1000)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = {"prompt": "long", "max_tokens": 1000, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
                assert len(received) == 3
            # The connection is closed: the model thread is told to stop at its next token.
            assert wait_for(lambda: fake.streams and fake.streams[0]["finished"], timeout=3)
            assert fake.streams[0]["produced"] < 200
            assert fake.streams[0]["should_stop"]()  # what the model polls now says stop
            assert wait_for(lambda: http.get("/health").json()["pending"] == 0, timeout=3)
            # The model is free again for the next client.
            assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_client_gone_while_queued_never_reaches_the_model():
    fake = FakeLanguageModel(delay=0.01)
    with BackgroundServer(create_app(fake, MODEL, max_tokens_limit=1000)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        first = http.send(http.build_request("POST", "/v1/completions",
                                             json={"prompt": "first", "max_tokens": 300, "stream": True}), stream=True)
        assert fake.stream_started.wait(5)
        for stream in (False, True):  # waits behind the first stream, then its client gives up
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json={"prompt": f"queued-{stream}", "max_tokens": 5, "stream": stream},
                          timeout=0.3)
        first.close()
        assert wait_for(lambda: http.get("/health").json()["pending"] == 0, timeout=5)
        assert http.post("/v1/completions", json={"prompt": "after", "max_tokens": 2}).status_code == 200
    assert [call[1] for call in fake.calls] == ["first", "after"]


def test_busy_server_answers_503(fake):
    slow = FakeLanguageModel(delay=0.01)
    with BackgroundServer(create_app(slow, MODEL, max_tokens_limit=1000, max_pending=1)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 300, "stream": True}):
            assert slow.stream_started.wait(5)
            busy = http.post("/v1/completions", json={"prompt": "b", "max_tokens": 1})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "server_busy"


def test_graceful_shutdown_ends_running_streams():
    fake = FakeLanguageModel(delay=0.01)
    app = create_app(fake, MODEL, max_tokens_limit=2000)
    server = BackgroundServer(app, graceful_timeout=0.5).start()
    http = httpx.Client(base_url=server.url, timeout=30)
    try:
        response = http.send(http.build_request("POST", "/v1/completions",
                                                json={"prompt": "x", "max_tokens": 2000, "stream": True}), stream=True)
        assert fake.stream_started.wait(5)
        started = time.perf_counter()
        server.stop()  # 2000 tokens would take 20 s; the grace period is 0.5 s
        assert time.perf_counter() - started < 5
        assert fake.streams[0]["finished"] and fake.streams[0]["produced"] < 1000
        assert fake.streams[0]["should_stop"]()
        response.close()
        with pytest.raises(httpx.ConnectError):
            http.get(server.url + "/health")
    finally:
        http.close()
        server.stop()


def test_default_bind_is_loopback_and_a_taken_port_is_a_user_error(fake):
    import inspect

    from tinystories.serve import serve

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(BackgroundServer).parameters["host"].default == "127.0.0.1"
    taken = bind_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
    finally:
        taken.close()
    with pytest.raises(UserError, match="--port"):
        bind_socket("127.0.0.1", 70000)


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_serve_arguments(monkeypatch, capsys):
    from tinystories.cli import main
    from tinystories.cli.serve import served_name

    assert main(["serve", "runs/a", "--model", "tiny"]) == 2
    assert "either RUN or --model" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--max-tokens-limit", "0"]) == 2
    assert main(["serve", "--model", "tiny", "--port", "99999"]) == 2
    assert served_name("/x/runs/story-run", None) == "story-run"
    assert served_name("/x/runs/story-run/checkpoints/best", None) == "story-run"
    assert served_name(None, "tiny") == "tiny"
    with pytest.raises(SystemExit) as help_exit:
        main(["serve", "--help"])
    assert help_exit.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--model", "--checkpoint", "--host", "--port", "--max-tokens-limit", "--device"):
        assert option in usage


# ----------------------------------------------------------------------------------------------
# The real generation stack: a tiny random-weight model in a run directory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from tinystories.checkpoint import save_checkpoint
    from tinystories.config import ModelConfig, RunConfig, TrainConfig
    from tinystories.model import GPT
    from tinystories.tokenizer import make_tokenizer

    tokenizer = make_tokenizer("bytes")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("serve-run") / "story-run"
    directory.mkdir()
    RunConfig(model=config, train=TrainConfig(), tokenizer=tokenizer.spec).save(directory / "config.json")
    tokenizer.save(directory)
    save_checkpoint(directory / "checkpoints" / "best", GPT(config))
    return directory


@pytest.fixture(scope="module")
def real_model(tiny_run):
    generate = pytest.importorskip("tinystories.generate", reason="tinystories.generate is not there yet")
    return generate.load_model(tiny_run)


def test_real_model_completions_are_generates(real_model):
    prompt = "Once upon a time"
    with TestClient(create_app(real_model, "story-run", max_tokens_limit=LIMIT)) as client:
        for sampling in ({"temperature": 0}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 3}):
            body = {"model": "story-run", "prompt": prompt, "max_tokens": 12, **sampling}
            plain = post(client, body).json()
            (expected,) = real_model.generate(prompt, max_new_tokens=12, **sampling)
            choice = plain["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == (expected.text, expected.finish_reason)
            assert plain["usage"]["prompt_tokens"] == len(real_model.encode_prompt(prompt)) == expected.prompt_tokens
            assert plain["usage"]["completion_tokens"] == len(expected.token_ids)

            payloads = sse_payloads(post(client, dict(body, stream=True, stream_options={"include_usage": True})).text)
            events = [json.loads(p) for p in payloads[:-1]]
            streamed = "".join(e["choices"][0]["text"] for e in events if e["choices"])
            assert streamed == expected.text  # the stream of the same seed is the same story
            assert events[-2]["choices"][0]["finish_reason"] == expected.finish_reason
            assert events[-1]["usage"] == plain["usage"]

        batch = post(client, {"prompt": ["Tom", "A big cat"], "n": 2, "max_tokens": 6, "seed": 9}).json()
        expected = real_model.generate(["Tom", "A big cat"], num_samples=2, max_new_tokens=6, seed=9)
        assert [c["text"] for c in batch["choices"]] == [e.text for e in expected]
        # Bad sampling options are refused before the model, with the same limits it has.
        assert_openai_error(post(client, {"prompt": "x", "top_p": 0}), 400, "top_p")


def test_real_model_through_the_openai_client(real_model):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")
    with BackgroundServer(create_app(real_model, "story-run", max_tokens_limit=LIMIT)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)
        plain = client.completions.create(model="story-run", prompt="The sun", max_tokens=10, temperature=0)
        streamed = client.completions.create(model="story-run", prompt="The sun", max_tokens=10, temperature=0,
                                             stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed) == plain.choices[0].text
        assert plain.choices[0].text == real_model.generate("The sun", max_new_tokens=10, temperature=0)[0].text


def test_cli_serve_loads_the_run_and_serves_it(tiny_run, monkeypatch):
    pytest.importorskip("tinystories.generate", reason="tinystories.generate is not there yet")
    import tinystories.serve
    from tinystories.cli import main

    served = {}
    monkeypatch.setattr(tinystories.serve, "serve", lambda lm, name, **options: served.update(lm=lm, name=name, **options))
    assert main(["serve", str(tiny_run), "--checkpoint", "last", "--port", "8123", "--max-tokens-limit", "50"]) == 0
    assert served["name"] == "story-run"
    assert (served["host"], served["port"], served["max_tokens_limit"]) == ("127.0.0.1", 8123, 50)
    assert served["lm"].generate("Hi", max_new_tokens=3, temperature=0)[0].token_ids  # a working model
    assert main(["serve", str(tiny_run / "missing")]) == 2  # a bad RUN is a one-line error
