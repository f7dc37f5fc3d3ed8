"""The HTTP server: API shape, validation, logprobs and echo, streaming, batching, disconnects, shutdown.

In-process tests use Starlette's TestClient; live tests run uvicorn on 127.0.0.1 (a free port) in a
background thread, stopped at the end of each test. The model is `serve_fakes.FakeLanguageModel` (a
fake decode engine emitting deterministic pieces) or a tiny random-weight model in a run directory.
No test measures time: the fakes record what happened (rounds, starts, releases) instead.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import threading
import time

import httpx
import pytest
import torch
from serve_fakes import CRASH_PROMPT, FAIL_PROMPT, PIECES, FakeLanguageModel, expected_pieces, fake_logprob
from starlette.testclient import TestClient

from tinystories.config import SamplingConfig
from tinystories.errors import UserError
from tinystories.serve import BackgroundServer, bind_socket, create_app
from tinystories.serve_schema import OPENAI_DEFAULT_MAX_TOKENS

MODEL = "fake-tiny"
LIMIT = 64


@pytest.fixture
def fake() -> FakeLanguageModel:
    return FakeLanguageModel()


@pytest.fixture
def client(fake):
    app = create_app(fake, MODEL, max_tokens_limit=LIMIT, max_body_bytes=4096, model_process=False)
    with TestClient(app) as test_client:
        yield test_client


def post(client, body, **kwargs):
    return client.post("/v1/completions", json=body, **kwargs)


def sse_payloads(text: str) -> list[str]:
    """The data payloads of a server-sent-events body, checking its framing."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: "):] for event in events]


def streamed_texts(text: str) -> dict[int, str]:
    """Each choice's text, joined from a complete event stream."""
    payloads = sse_payloads(text)
    assert payloads[-1] == "[DONE]"
    texts: dict[int, str] = {}
    for event in (json.loads(p) for p in payloads[:-1]):
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


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


def prompt_tokens(prompt: str) -> int:
    return 1 + len(prompt.encode())  # <|endoftext|> + one fake token per byte


# ----------------------------------------------------------------------------------------------
# Endpoints


def test_health_models_and_page(client):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model": MODEL, "max_tokens_limit": LIMIT, "pending": 0, "slots": 16}

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
    read = prompt_tokens("Once upon a time")
    assert result["usage"] == {"prompt_tokens": read, "completion_tokens": 5, "total_tokens": read + 5}
    # The request's fields reach the engine as the library's SamplingConfig, unchanged.
    (start,) = fake.starts
    assert start["config"] == SamplingConfig(max_new_tokens=5, temperature=0.5, top_p=0.9, top_k=20,
                                             repetition_penalty=1.1, seed=7)
    assert start["seed"] == 7 and start["tokens"][0] == fake.tokenizer.eot_id and start["released"]


def test_defaults_are_the_librarys_but_max_tokens_is_openais(client, fake):
    result = post(client, {"prompt": "Hi"}).json()  # `model` may be left out: there is one
    assert fake.starts[0]["config"] == SamplingConfig(max_new_tokens=OPENAI_DEFAULT_MAX_TOKENS)
    assert result["usage"]["completion_tokens"] == OPENAI_DEFAULT_MAX_TOKENS == 16


def test_prompt_list_and_n_are_rows_of_one_batch(client, fake):
    result = post(client, {"prompt": ["Tom", "Lily went"], "n": 2, "max_tokens": 3, "seed": 1}).json()
    assert [s["prompt"] for s in fake.starts] == ["Tom", "Tom", "Lily went", "Lily went"]
    assert [s["seed"] for s in fake.starts] == [1, 2, 1, 2]  # sample j of a prompt: seed + j, as generate
    assert max(fake.rounds) == 4 and fake.prefills == [4]  # all four prefilled and decoded together
    expected = ["".join(expected_pieces(p, 1 + s, 3)) for p in ("Tom", "Lily went") for s in range(2)]
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in result["choices"]] == expected
    assert result["choices"][0]["text"] != result["choices"][1]["text"]  # n samples differ
    assert result["usage"]["prompt_tokens"] == prompt_tokens("Tom") + prompt_tokens("Lily went")  # once per prompt
    assert result["usage"]["completion_tokens"] == 12


def test_token_id_prompts_are_read_as_given(client, fake):
    ids = fake.tokenizer.encode("Tom")
    result = post(client, {"prompt": [ids, ids + ids[:1]], "max_tokens": 2, "seed": 0}).json()
    assert [s["tokens"] for s in fake.starts] == [ids, ids + ids[:1]]  # no <|endoftext|> added
    assert [c["text"] for c in result["choices"]] == ["".join(expected_pieces("Tom", 0, 2)),
                                                       "".join(expected_pieces("TomT", 0, 2))]
    assert result["usage"]["prompt_tokens"] == 7


def test_stop_sequences_and_echo(client):
    # From seed 0 and a 3-character prompt the pieces are " ran to the park. He ..."
    result = post(client, {"prompt": "abc", "max_tokens": 10, "seed": 0, "stop": [" park", "zzz"]}).json()
    assert result["choices"][0]["text"] == " ran to the"
    assert result["choices"][0]["finish_reason"] == "stop"
    result = post(client, {"prompt": "abc", "max_tokens": 2, "seed": 0, "stop": ".", "echo": True}).json()
    assert result["choices"][0]["text"] == "abc ran to"


def test_logprobs_of_generated_tokens(client, fake):
    result = post(client, {"prompt": "abc", "max_tokens": 3, "seed": 0, "logprobs": 1}).json()
    (choice,) = result["choices"]
    tokens = [PIECES.index(piece) for piece in expected_pieces("abc", 0, 3)]
    assert choice["logprobs"] == {
        "tokens": [PIECES[t] for t in tokens],
        "token_logprobs": [fake_logprob(t) for t in tokens],
        "top_logprobs": [{PIECES[0]: fake_logprob(0)} for _ in tokens],
        "text_offset": [0, len(PIECES[tokens[0]]), len(PIECES[tokens[0]]) + len(PIECES[tokens[1]])],
    }
    zero = post(client, {"prompt": "abc", "max_tokens": 1, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert zero["top_logprobs"] == [{}]


def test_echo_with_max_tokens_zero_scores_the_prompt(client, fake):
    result = post(client, {"prompt": "ab", "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    (choice,) = result["choices"]
    assert choice["text"] == "ab" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [None, -0.5],
                                  "top_logprobs": [None, {PIECES[0]: -0.25}], "text_offset": [0, 1]}
    assert fake.scored == [[fake.tokenizer.eot_id] + fake.tokenizer.encode("ab")] and fake.starts == []
    assert result["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    streamed = sse_payloads(post(client, {"prompt": "ab", "max_tokens": 0, "echo": True, "stream": True}).text)
    assert [json.loads(p)["choices"][0]["text"] for p in streamed[:-1]] == ["ab", ""]


def test_streaming_matches_the_plain_completion(client, fake):
    body = {"prompt": "The cat", "max_tokens": 6, "seed": 3, "temperature": 0.7, "logprobs": 2}
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
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for e in events for v in e["choices"][0]["logprobs"][key]] == plain["logprobs"][key]
    assert fake.starts[0]["config"] == fake.starts[1]["config"]


def test_streaming_usage_and_several_choices(client):
    body = {"prompt": ["ab", "abcd"], "n": 2, "max_tokens": 2, "seed": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    payloads = sse_payloads(post(client, body).text)
    usage_event = json.loads(payloads[-2])
    assert usage_event["choices"] == []
    assert usage_event["usage"] == {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}
    # Streamed choices are decoded together; sample j of a prompt uses seed + j.
    assert streamed_texts(post(client, body).text) == {
        0: "".join(expected_pieces("ab", 5, 2)), 1: "".join(expected_pieces("ab", 6, 2)),
        2: "".join(expected_pieces("abcd", 5, 2)), 3: "".join(expected_pieces("abcd", 6, 2))}


def test_a_prompt_longer_than_the_context_keeps_its_end():
    fake = FakeLanguageModel(context_length=8)
    with TestClient(create_app(fake, MODEL, max_tokens_limit=LIMIT, model_process=False)) as client:
        result = post(client, {"prompt": "abcdefghijkl", "max_tokens": 2, "seed": 0}).json()
        assert result["usage"]["prompt_tokens"] == 8  # the last 8 tokens were read
        assert fake.starts[0]["tokens"] == fake.tokenizer.encode("efghijkl")
        # Its log-probabilities would need the whole prompt in one window: refused, naming the prompt.
        error = assert_openai_error(post(client, {"prompt": "abcdefghijkl", "max_tokens": 0, "echo": True,
                                                  "logprobs": 1}), 400, "prompt")
        assert "context length 8" in error["message"]


# ----------------------------------------------------------------------------------------------
# Refusals: every bad input is a 4xx in OpenAI's shape and never reaches the model

BAD_REQUESTS = [
    ({"prompt": "x", "max_tokens": LIMIT + 1}, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),  # 0 only to score a prompt (echo)
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
    ({"prompt": "x", "logprobs": 6}, "logprobs", "invalid_value"),
    ({"prompt": "x", "logprobs": -1}, "logprobs", "invalid_value"),
    ({"prompt": "x", "logprobs": "5"}, "logprobs", "invalid_type"),
    ({}, "prompt", "missing_required_parameter"),
    ({"prompt": None}, "prompt", "missing_required_parameter"),
    ({"prompt": 5}, "prompt", "invalid_type"),
    ({"prompt": []}, "prompt", "invalid_type"),
    ({"prompt": ["a", 1]}, "prompt", "invalid_type"),
    ({"prompt": [[]]}, "prompt", "invalid_type"),
    ({"prompt": [1, 2, 10_000]}, "prompt", "invalid_value"),  # not a token of this vocabulary
    ({"prompt": [[1, -2]]}, "prompt", "invalid_value"),
    ({"prompt": ["x"] * 17}, "prompt", "invalid_value"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "unsupported_parameter"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    ({"prompt": "x", "logit_bias": {"1": 2}}, "logit_bias", "unsupported_parameter"),
    ({"prompt": "x", "best_of": 3}, "best_of", "unsupported_parameter"),
    ({"prompt": "x", "model": 3}, "model", "invalid_type"),
    ({"prompt": "x", "temprature": 1}, "temprature", "unknown_parameter"),
]


@pytest.mark.parametrize("body,param,code", BAD_REQUESTS,
                         ids=[f"{p}-{c}-{i}" for i, (_, p, c) in enumerate(BAD_REQUESTS)])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_parameters_are_400(client, fake, body, param, code, stream):
    if stream and "stream" not in body and "stream_options" not in body:
        body = dict(body, stream=True)
    assert_openai_error(post(client, body), 400, param, code)
    assert fake.starts == [] and fake.scored == []


def test_sampling_refusals_are_the_librarys_own_messages(client):
    for field, value in (("top_p", 0.0), ("repetition_penalty", -1.0), ("top_k", -3)):
        error = assert_openai_error(post(client, {"prompt": "x", field: value}), 400, field)
        with pytest.raises(UserError) as library:
            SamplingConfig(**{field: value})
        assert error["message"] == str(library.value)


def test_neutral_openai_fields_are_accepted(client):
    body = {"prompt": "x", "max_tokens": 1, "logprobs": None, "presence_penalty": 0, "frequency_penalty": 0.0,
            "logit_bias": {}, "best_of": 1, "user": "someone", "suffix": None, "stop": None, "seed": None}
    assert post(client, body).status_code == 200


def test_unknown_model_is_404(client, fake):
    assert_openai_error(post(client, {"model": "gpt-4", "prompt": "x"}), 404, "model", "model_not_found")
    assert fake.starts == []


@pytest.mark.parametrize("content", [b"{", b'{"prompt": "x",}', b"\xff\xfe", b'{"prompt": "x", "temperature": NaN}',
                                     b'{"prompt": "x", "top_p": Infinity}', b"[" * 1500 + b"]" * 1500, b"",
                                     b'["prompt"]', b'"prompt"', b"null"])
def test_malformed_json_is_400(client, fake, content):
    response = client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, None)
    assert fake.starts == []


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"])
def test_wrong_content_type_is_415(client, fake, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/v1/completions", content=b'{"prompt": "x"}', headers=headers)
    assert_openai_error(response, 415, None, "unsupported_media_type")
    assert fake.starts == []


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
    assert fake.starts == []


def test_unknown_urls_methods_and_chat_are_openai_errors(client):
    error = assert_openai_error(client.post("/v1/chat/completions", json={"messages": []}), 404, None, "unknown_url")
    assert "/v1/completions" in error["message"]
    assert_openai_error(client.get("/v1/nothing"), 404, None, "unknown_url")
    assert_openai_error(client.get("/v1/completions"), 405, None, "method_not_allowed")
    assert_openai_error(client.post("/health"), 405, None, "method_not_allowed")


def test_model_refusal_is_400_and_a_crash_is_a_json_500(fake):
    app = create_app(fake, MODEL, max_tokens_limit=LIMIT, model_process=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        for stream in (False, True):
            error = assert_openai_error(post(client, {"prompt": FAIL_PROMPT, "stream": stream}), 400, None)
            assert "refused by the model" in error["message"]
            crash = post(client, {"prompt": CRASH_PROMPT, "stream": stream})
            assert crash.status_code == 500
            assert crash.json()["error"]["type"] == "server_error"
            assert "simulated bug" not in crash.text  # internals stay in the server log
        # Once the response has started, a later failure is reported in-band and the stream ends.
        payloads = sse_payloads(post(client, {"prompt": ["fine", CRASH_PROMPT], "max_tokens": 2, "stream": True}).text)
        assert json.loads(payloads[-1])["error"]["message"] == "the model failed while generating"
        assert "[DONE]" not in payloads  # the stream did not complete
        assert [s["released"] for s in fake.starts if s["prompt"] == "fine"] == [True]  # its sibling stopped
        assert client.get("/health").json()["pending"] == 0  # every refused request gave back its count
        assert post(client, {"prompt": "after", "max_tokens": 2}).status_code == 200  # the worker goes on


def test_limits_are_checked_when_the_app_is_made(fake):
    with pytest.raises(UserError, match="max-tokens-limit"):
        create_app(fake, MODEL, max_tokens_limit=0, model_process=False)
    with pytest.raises(UserError, match="max-batch"):
        create_app(fake, MODEL, slots=0, model_process=False)


# ----------------------------------------------------------------------------------------------
# A live server on loopback: real clients, batching, disconnects, shutdown


def test_openai_client_plain_streamed_and_logprobs(fake):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")
    with BackgroundServer(create_app(fake, MODEL, max_tokens_limit=LIMIT, model_process=False)) as server:
        assert server.url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)
        assert [model.id for model in client.models.list()] == [MODEL]

        completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7, seed=11,
                                               temperature=0.8, extra_body={"top_k": 40}, logprobs=5)
        expected = expected_pieces("Once upon a time", 11, 7)
        choice = completion.choices[0]
        assert choice.text == "".join(expected) and choice.finish_reason == "length"
        assert choice.logprobs.tokens == expected
        assert choice.logprobs.token_logprobs == [fake_logprob(PIECES.index(p)) for p in expected]
        assert choice.logprobs.top_logprobs[0] == {PIECES[0]: fake_logprob(0)}
        assert completion.usage.completion_tokens == 7
        assert fake.starts[-1]["config"].top_k == 40

        stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=7, seed=11,
                                           temperature=0.8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "".join(expected)
        assert chunks[-1].usage.completion_tokens == 7

        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="x", max_tokens=LIMIT + 1)
        assert refused.value.body["param"] == "max_tokens"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def run_concurrently(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send every body at once, one thread each; the responses in order."""
    responses: list = [None] * len(bodies)

    def send(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            responses[i] = http.post("/v1/completions", json=bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return responses


@pytest.mark.parametrize("slots", [16, 1], ids=["batched", "one-at-a-time"])
def test_concurrent_requests_are_decoded_together(slots):
    fake = FakeLanguageModel(delay=0.01)
    bodies = [{"prompt": f"p{i}", "max_tokens": 10 + i, "seed": i, "stream": i % 2 == 1} for i in range(8)]
    with BackgroundServer(create_app(fake, MODEL, max_tokens_limit=LIMIT, slots=slots, model_process=False)) as server:
        responses = run_concurrently(server.url, bodies)
        with httpx.Client(base_url=server.url) as http:
            assert http.get("/health").json()["pending"] == 0
    assert [r.status_code for r in responses] == [200] * 8
    for i, response in enumerate(responses):
        expected = "".join(expected_pieces(f"p{i}", i, 10 + i))
        text = streamed_texts(response.text)[0] if i % 2 else response.json()["choices"][0]["text"]
        assert text == expected  # each row keeps its own seed and length, batched or not
    assert fake.engines == 1  # one engine for the server's lifetime
    if slots == 1:
        assert max(fake.rounds) == 1
    else:  # requests joined a running batch and left it as they ended (lengths differ)
        assert max(fake.rounds) > 1 and len(set(fake.rounds)) > 2


def test_while_the_model_is_busy_the_event_loop_still_answers():
    fake = FakeLanguageModel(delay=0.01)
    with BackgroundServer(create_app(fake, MODEL, max_tokens_limit=1000, slots=1, model_process=False)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        first = http.send(http.build_request("POST", "/v1/completions",
                                             json={"prompt": "long", "max_tokens": 500, "stream": True}), stream=True)
        assert fake.stream_started.wait(10)
        assert http.get("/health").json()["pending"] == 1  # answered while the model decodes
        first.close()


def test_a_client_that_disconnects_mid_stream_frees_its_slot_at_once():
    fake = FakeLanguageModel(delay=0.01)  # 1000 tokens would take 10 s
    with BackgroundServer(create_app(fake, MODEL, max_tokens_limit=1000, slots=1, model_process=False)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        body = {"prompt": "long", "max_tokens": 1000, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            received = [line for line, _ in zip(response.iter_lines(), range(6)) if line.startswith("data: ")]
            assert len(received) == 3
        # The connection is closed: the one slot is freed and the next request is served at once.
        after = http.post("/v1/completions", json={"prompt": "next", "max_tokens": 2})
        assert after.status_code == 200
        abandoned, following = fake.starts
        assert abandoned["released"] and following["prompt"] == "next"
        assert following["others_produced"]["long"] < 1000  # it did not wait for the abandoned max_tokens
        assert wait_for(lambda: http.get("/health").json()["pending"] == 0)


def test_a_client_gone_while_queued_never_reaches_the_model():
    fake = FakeLanguageModel(delay=0.01)
    with BackgroundServer(create_app(fake, MODEL, max_tokens_limit=1000, slots=1, model_process=False)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        first = http.send(http.build_request("POST", "/v1/completions",
                                             json={"prompt": "first", "max_tokens": 300, "stream": True}), stream=True)
        assert fake.stream_started.wait(10)
        for stream in (False, True):  # waits behind the first stream, then its client gives up
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json={"prompt": f"queued-{stream}", "max_tokens": 5, "stream": stream},
                          timeout=0.3)
        first.close()
        assert wait_for(lambda: http.get("/health").json()["pending"] == 0)
        assert http.post("/v1/completions", json={"prompt": "after", "max_tokens": 2}).status_code == 200
    assert [start["prompt"] for start in fake.starts] == ["first", "after"]


def test_busy_server_answers_503():
    slow = FakeLanguageModel(delay=0.01)
    app = create_app(slow, MODEL, max_tokens_limit=1000, max_pending=1, model_process=False)
    with BackgroundServer(app) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 300, "stream": True}):
            assert slow.stream_started.wait(10)
            busy = http.post("/v1/completions", json={"prompt": "b", "max_tokens": 1})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "server_busy"


def test_graceful_shutdown_ends_running_streams():
    fake = FakeLanguageModel(delay=0.01)
    app = create_app(fake, MODEL, max_tokens_limit=2000, model_process=False)
    server = BackgroundServer(app, graceful_timeout=0.5).start()
    http = httpx.Client(base_url=server.url, timeout=30)
    try:
        response = http.send(http.build_request("POST", "/v1/completions",
                                                json={"prompt": "x", "max_tokens": 2000, "stream": True}), stream=True)
        assert fake.stream_started.wait(10)
        server.stop()  # 2000 tokens would take 20 s; the grace period is 0.5 s
        assert fake.starts[0]["produced"] < 2000  # the stream was ended, not run to its end
        response.close()
        with pytest.raises(httpx.ConnectError):
            http.get(server.url + "/health")
    finally:
        http.close()
        server.stop()


def test_bad_input_leaves_no_traceback_in_the_server_log(caplog):
    fake = FakeLanguageModel()
    bad_bodies = [b"{", b"\xff\xfe\xfd", b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": 100000}',
                  b'{"prompt": "' + b"y" * 300_000 + b'"}', b'{"prompt": [1, 99999]}', b'{"prompt": "x", "n": []}']
    json_type = {"Content-Type": "application/json"}
    with caplog.at_level(logging.DEBUG), \
            BackgroundServer(create_app(fake, MODEL, max_tokens_limit=LIMIT, model_process=False),
                             log_level="info") as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        for content in bad_bodies:
            response = http.post("/v1/completions", content=content, headers=json_type)
            assert 400 <= response.status_code < 500, content[:40]
        # A 100 KB prompt is valid: the model reads its last context_length tokens.
        long = http.post("/v1/completions", json={"prompt": "y" * 100_000, "max_tokens": 1})
        assert long.json()["usage"]["prompt_tokens"] == fake.context_length
        assert http.get("/health").status_code == 200
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert [start["prompt"] for start in fake.starts] == ["y" * (fake.context_length)]


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
    assert main(["serve", "--model", "tiny", "--max-batch", "0"]) == 2
    assert main(["serve", "--model", "tiny", "--port", "99999"]) == 2
    assert served_name("/x/runs/story-run", None) == "story-run"
    assert served_name("/x/runs/story-run/checkpoints/best", None) == "story-run"
    assert served_name(None, "tiny") == "tiny"
    with pytest.raises(SystemExit) as help_exit:
        main(["serve", "--help"])
    assert help_exit.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--model", "--checkpoint", "--host", "--port", "--max-tokens-limit", "--max-batch",
                   "--no-compile", "--device"):
        assert option in usage


# ----------------------------------------------------------------------------------------------
# The real generation stack: a tiny random-weight model in a run directory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tinystories.checkpoint import save_checkpoint
    from tinystories.config import ModelConfig, RunConfig, TrainConfig
    from tinystories.model import GPT
    from tinystories.tokenizer import make_tokenizer

    tokenizer = make_tokenizer("bytes")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # large random weights: greedy text varies instead of repeating one byte
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    directory = tmp_path_factory.mktemp("serve-run") / "story-run"
    directory.mkdir()
    RunConfig(model=config, train=TrainConfig(), tokenizer=tokenizer.spec).save(directory / "config.json")
    tokenizer.save(directory)
    save_checkpoint(directory / "checkpoints" / "best", model)
    return directory


@pytest.fixture(scope="module")
def real_model(tiny_run):
    from tinystories.generate import load_model

    return load_model(tiny_run)


def reference_logprobs(lm, tokens: list[int]) -> torch.Tensor:
    """Log-softmax of one plain forward over `tokens`: row i is the distribution after tokens[:i + 1]."""
    with torch.no_grad():
        logits, _ = lm.model(torch.tensor([tokens]))
    return torch.log_softmax(logits[0].double(), dim=-1)


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
        # Bad sampling options are refused before the model, with the library's own rules.
        assert_openai_error(post(client, {"prompt": "x", "top_p": 0}), 400, "top_p")


def test_real_model_concurrent_rows_get_what_they_would_alone(real_model):
    """Continuous batching on the real engine: requests with their own options arrive together and end
    at different steps; each one's text equals generating it alone."""
    bodies = [{"prompt": "Tom", "max_tokens": 40, "temperature": 0},
              {"prompt": "The sun was", "max_tokens": 25, "temperature": 0, "repetition_penalty": 1.3},
              {"prompt": "A dog", "max_tokens": 70, "temperature": 0.8, "top_k": 30, "seed": 4},
              {"prompt": "", "max_tokens": 33, "temperature": 1.1, "top_p": 0.9, "seed": 12}]
    with BackgroundServer(create_app(real_model, "story-run", max_tokens_limit=LIMIT * 2, slots=4)) as server:
        responses = run_concurrently(server.url, bodies)
    for body, response in zip(bodies, responses):
        options = {k: v for k, v in body.items() if k not in ("prompt", "max_tokens")}
        (alone,) = real_model.generate(body["prompt"], max_new_tokens=body["max_tokens"], **options)
        assert response.json()["choices"][0]["text"] == alone.text, body
    assert len({r.json()["choices"][0]["text"] for r in responses}) == 4


def test_real_model_logprobs_and_prompt_scores_are_the_models(real_model):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")
    tokenizer = real_model.tokenizer
    with BackgroundServer(create_app(real_model, "story-run", max_tokens_limit=LIMIT)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)
        completion = client.completions.create(model="story-run", prompt="The sun", max_tokens=10, temperature=0,
                                               logprobs=5)
        scored = client.completions.create(model="story-run", prompt="The sun was hot.", max_tokens=0, echo=True,
                                           logprobs=3)
    generated = real_model.generate("The sun", max_new_tokens=10, temperature=0)[0].token_ids
    prompt = real_model.encode_prompt("The sun")
    reference = reference_logprobs(real_model, prompt + generated)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in generated]
    for i, token in enumerate(generated):
        row = reference[len(prompt) - 1 + i]
        assert logprobs.token_logprobs[i] == pytest.approx(float(row[token]), abs=1e-4)
        best = torch.topk(row, 5)
        alternatives: dict[str, float] = {}  # by text: the pieces of one UTF-8 character share one (U+FFFD)
        for alternative, value in zip(best.indices.tolist(), best.values.tolist()):
            alternatives.setdefault(tokenizer.decode([alternative]), value)
        assert logprobs.top_logprobs[i] == pytest.approx(alternatives, abs=1e-4)
        assert int(best.indices[0]) == token  # greedy: the chosen token is the likeliest
    text = completion.choices[0].text
    offsets = logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    pieces = logprobs.tokens
    for i, (offset, piece) in enumerate(zip(offsets, pieces)):
        if "\ufffd" not in piece and (i == 0 or "\ufffd" not in pieces[i - 1]):
            assert text[offset:].startswith(piece)  # a whole character after whole ones: found at its offset

    own = tokenizer.encode("The sun was hot.")
    reference = reference_logprobs(real_model, [tokenizer.eot_id] + own)
    echo = scored.choices[0].logprobs
    assert scored.choices[0].text == "The sun was hot." and echo.tokens == [tokenizer.decode([t]) for t in own]
    assert echo.token_logprobs[0] is None and echo.top_logprobs[0] is None  # as OpenAI: the first has no context
    expected = [float(reference[i, t]) for i, t in enumerate(own)][1:]  # token i after <|endoftext|> + own[:i]
    assert echo.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(1 <= len(top) <= 3 for top in echo.top_logprobs[1:])  # 3 alternatives, fewer if texts coincide
    assert scored.usage.completion_tokens == 0


def test_real_model_through_the_openai_client(real_model):
    openai = pytest.importorskip("openai", reason="the openai client is not installed (dev extra)")
    with BackgroundServer(create_app(real_model, "story-run", max_tokens_limit=LIMIT)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)
        plain = client.completions.create(model="story-run", prompt="The sun", max_tokens=10, temperature=0)
        streamed = client.completions.create(model="story-run", prompt="The sun", max_tokens=10, temperature=0,
                                             stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed) == plain.choices[0].text
        assert plain.choices[0].text == real_model.generate("The sun", max_new_tokens=10, temperature=0)[0].text


@pytest.fixture(scope="module")
def endless_model(real_model):
    """The real model with its final norm's weights zeroed: every logit is 0, so greedy decoding picks
    token 0 forever and a stream runs to its max_tokens, never to the end-of-text token."""
    endless = copy.deepcopy(real_model)
    with torch.no_grad():
        endless.model.norm_f.weight.zero_()
    (story,) = endless.generate("Tom", max_new_tokens=300, temperature=0)
    assert story.finish_reason == "length"
    return endless


ENDLESS = {"prompt": "Tom", "max_tokens": 10**6, "temperature": 0, "stream": True}  # hours of tokens


def test_model_process_frees_the_slot_of_a_client_gone_mid_stream(endless_model):
    """The real server decodes in its own process; a client's leaving crosses to it: with one slot, a
    stream asking for a million tokens is dropped, and the next request is served at once."""
    app = create_app(endless_model, "story-run", max_tokens_limit=10**6, slots=1)
    worker = app.state.worker
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert worker.alive and worker.pid != os.getpid()
        with http.stream("POST", "/v1/completions", json=ENDLESS) as response:
            received = [line for line, _ in zip(response.iter_lines(), range(6)) if line.startswith("data: ")]
            assert len(received) == 3
        after = http.post("/v1/completions", json={"prompt": "Tom", "max_tokens": 5, "temperature": 0})
        (alone,) = endless_model.generate("Tom", max_new_tokens=5, temperature=0)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == alone.text
        assert wait_for(lambda: http.get("/health").json()["pending"] == 0)
    assert not worker.alive  # the graceful shutdown ended the model process too


def test_a_graceful_shutdown_mid_stream_ends_the_model_process_too(endless_model):
    app = create_app(endless_model, "story-run", max_tokens_limit=10**6, slots=1)
    worker, server = app.state.worker, BackgroundServer(app, graceful_timeout=0.5).start()
    http = httpx.Client(base_url=server.url, timeout=30)
    try:
        response = http.send(http.build_request("POST", "/v1/completions", json=ENDLESS), stream=True)
        assert next(line for line in response.iter_lines() if line.startswith("data: "))
        server.stop()  # the stream would take hours; the grace period is 0.5 s
        assert not worker.alive and worker.exitcode == 0  # told to close, it closed
        response.close()
    finally:
        http.close()
        server.stop()


def test_a_model_that_cannot_go_to_a_model_process_is_a_clear_error(fake):
    worker = create_app(fake, MODEL).state.worker  # the stand-in holds a threading.Event: it cannot pickle
    with pytest.raises(UserError, match="model_process=False"):
        worker.prepare()
    assert not worker.alive


def test_a_model_process_that_dies_fails_its_requests_then_refuses_new_ones(endless_model):
    app = create_app(endless_model, "story-run", max_tokens_limit=10**6, slots=2)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        body = ENDLESS
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(next(lines)[len("data: "):])["choices"][0]["text"] is not None
            os.kill(app.state.worker.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
            last = list(lines)[-1]
        assert json.loads(last[len("data: "):])["error"]["type"] == "server_error"  # no [DONE]
        refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_exited"
        assert http.get("/health").status_code == 200  # the server itself still answers


def test_cli_serve_loads_the_run_and_serves_it(tiny_run, monkeypatch):
    import tinystories.serve
    from tinystories.cli import main

    served = {}
    monkeypatch.setattr(tinystories.serve, "serve",
                        lambda lm, name, **options: served.update(lm=lm, name=name, **options))
    assert main(["serve", str(tiny_run), "--checkpoint", "last", "--port", "8123", "--max-tokens-limit", "50",
                 "--max-batch", "4", "--no-compile"]) == 0
    assert served["name"] == "story-run"
    assert (served["host"], served["port"], served["max_tokens_limit"], served["slots"]) == ("127.0.0.1", 8123, 50, 4)
    assert served["lm"].compile is False
    assert served["lm"].generate("Hi", max_new_tokens=3, temperature=0)[0].token_ids  # a working model
    assert main(["serve", str(tiny_run / "missing")]) == 2  # a bad RUN is a one-line error


# ----------------------------------------------------------------------------------------------
# A peer tool: EleutherAI's lm-evaluation-harness scoring text through /v1/completions


LM_EVAL_TASK = """task: tinystories_val_slice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""


def lm_eval_loglikelihoods(server_url: str, tokenizer_dir, stories: list[str], work) -> list[float]:
    """Each story's log-likelihood as `lm_eval --model local-completions` computes it from our
    /v1/completions (echo + logprobs), with the exported HF tokenizer read offline."""
    import os
    import subprocess
    import sys

    data = work / "stories.jsonl"
    data.write_text("".join(json.dumps({"text": story}) + "\n" for story in stories), encoding="utf-8")
    (work / "task.yaml").write_text(LM_EVAL_TASK.format(data=data), encoding="utf-8")
    model_args = (f"model=tiny,base_url={server_url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={tokenizer_dir},max_length=256,num_concurrent=1,max_retries=1")
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
               "--tasks", "tinystories_val_slice", "--include_path", str(work), "--log_samples",
               "--output_path", str(work / "out")]
    environment = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                       OPENAI_API_KEY="unused", TOKENIZERS_PARALLELISM="false")
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    (samples,) = list((work / "out").rglob("samples_tinystories_val_slice*.jsonl"))
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    by_story = {record["doc"]["text"]: record["resps"][0][0] for record in records}
    return [float(by_story[story][0] if isinstance(by_story[story], list) else by_story[story]) for story in stories]


@pytest.mark.slow
def test_lm_eval_harness_loglikelihoods_equal_tinystories_eval(tmp_path, valid_stories):
    """lm-eval's loglikelihood of each validation story, through the server, equals `tinystories
    eval`'s (evaluate_text) within 1e-3 nats per token."""
    import lm_eval  # noqa: F401  (the dev extra installs it: a missing peer tool fails, not skips)
    from tinystories import cli
    from tinystories.evaluate import evaluate_text
    from tinystories.generate import load_model

    tiny = load_model("tiny")
    stories = [s for s in valid_stories if len(tiny.tokenizer.encode(s)) < tiny.context_length - 2][:12]
    assert len(stories) == 12
    assert cli.main(["export", "tiny", "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    with BackgroundServer(create_app(tiny, "tiny", max_tokens_limit=16)) as server:
        theirs = lm_eval_loglikelihoods(server.url, tmp_path / "hf", stories, tmp_path)
    for story, loglikelihood in zip(stories, theirs):
        ours = evaluate_text(tiny, [story])  # <|endoftext|> story: every token of the story predicted once
        assert abs(-loglikelihood - ours["nats"]) / ours["tokens"] < 1e-3, story[:60]
