"""The server under faults: a small run of benchmarks/serve_faults.py, and the bugs its sweep found.

The sweep starts a real `tinystories serve --model tiny` in a subprocess and sends a shuffled mix of
valid requests, bad input and clients that hang up; every valid answer must equal the in-process
`generate`, every bad one must be an OpenAI-shaped 4xx, and the server must end healthy, idle and
without a traceback. The other tests pin the fixes: option values the decode engine cannot hold,
a start refused half-way (its slot used to stay taken and fail every other row), and JSON strings
with unpaired UTF-16 surrogates (answers repeating them could not be encoded: a 500).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the 'serve' extra (starlette) is not installed")
from serve_fakes import FakeLanguageModel  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from tinystories.config import SamplingConfig  # noqa: E402
from tinystories.serve import create_app  # noqa: E402
from tinystories.serve_worker import BatchWorker, Job  # noqa: E402

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_faults.py"


@pytest.fixture(scope="module")
def serve_faults():
    spec = importlib.util.spec_from_file_location("serve_faults", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_faults"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    from tinystories.generate import load_model

    return load_model("tiny")


def post(client, content: bytes):
    return client.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})


@pytest.mark.slow
def test_a_fault_sweep_leaves_the_server_whole(serve_faults, tmp_path):
    sweep = serve_faults.run_sweep(60, 32, tmp_path, compile_step=False)
    kinds = {outcome.kind for outcome in sweep.outcomes}
    assert kinds == set(serve_faults.MIX) and len(sweep.outcomes) == 60  # every kind of fault was sent
    wrong = [(o.kind, o.status, o.detail) for o in sweep.outcomes if not o.correct]
    assert wrong == []  # valid answers equal generate(); refusals are OpenAI-shaped 4xx naming the field
    assert not sweep.crashed and sweep.tracebacks == 0, sweep.log_tail
    assert sweep.health_ok and sweep.pending_after == 0  # every slot given back, hung-up clients' too
    assert sweep.graceful
    refusals = [o for o in sweep.outcomes if o.kind in ("invalid JSON", "wrong types", "huge max_tokens",
                                                        "non-UTF-8 text")]
    assert refusals and all(o.status.startswith("4") for o in refusals)


def test_the_sweeps_judge_catches_wrong_answers(serve_faults):
    ok = {"error": {"message": "bad", "type": "invalid_request_error", "param": "top_k", "code": None}}
    assert serve_faults.error_problem(400, ok, "top_k") == ""
    assert "4xx" in serve_faults.error_problem(500, ok, "top_k")
    assert "param" in serve_faults.error_problem(400, ok, "max_tokens")
    assert "shape" in serve_faults.error_problem(400, {"detail": "bad"}, None)
    case = serve_faults.valid_case("valid greedy", 0)
    assert serve_faults.valid_problem(case, "the text", None, {case.expected: "the text"}) == ""
    assert "generate()" in serve_faults.valid_problem(case, "another", None, {case.expected: "the text"})
    stream = ['data: {"choices": [{"text": "a"}]}', "", 'data: {"choices": [{"text": "b"}]}', "", "data: [DONE]"]
    assert serve_faults.stream_result(stream) == ("ab", None, "")
    assert "DONE" in serve_faults.stream_result(stream[:-1])[2]  # a stream cut short is not a valid answer


def test_option_values_the_engine_cannot_hold_are_clamped_or_refused(tiny):
    """top_k beyond the vocabulary keeps every token (as top_k 0 does); a repetition penalty past
    float32 is a 400 naming it. Both used to fail inside the engine: a 500 and a traceback."""
    with TestClient(create_app(tiny, "tiny", max_tokens_limit=64)) as client:
        body = {"prompt": "Tom", "max_tokens": 12, "temperature": 0.8, "seed": 3}
        huge_k = post(client, json.dumps(dict(body, top_k=10**30)).encode())
        assert huge_k.status_code == 200, huge_k.text
        (alone,) = tiny.generate("Tom", max_new_tokens=12, temperature=0.8, seed=3, top_k=0)
        assert huge_k.json()["choices"][0]["text"] == alone.text
        penalty = post(client, json.dumps(dict(body, repetition_penalty=1e300)).encode())
        assert penalty.status_code == 400 and penalty.json()["error"]["param"] == "repetition_penalty"


def test_a_start_refused_half_way_frees_its_slot(tiny):
    """Three jobs join one round; the engine refuses the middle one after taking its slot. The slot
    is given back, so the other two decode on and get what generate() gives (they used to fail, and
    every later round with them, on the slot nobody owned)."""
    events: list = []
    ended = threading.Event()

    def emit(event) -> None:  # called on the model thread (no event loop)
        events.append(event)
        if sum(kind in ("end", "error") for kind, _, _ in events) == 3:
            ended.set()

    worker = BatchWorker(tiny, slots=4, max_pending=8)
    good = SamplingConfig(max_new_tokens=20, temperature=0)
    unrepresentable = SamplingConfig(max_new_tokens=3, temperature=1.0)
    unrepresentable.temperature = 1e39  # set past validation: no float32 holds it, so the engine refuses
    for index, config in enumerate([good, unrepresentable, good]):
        worker.submit(Job(index, tiny.encode_prompt("Tom"), config, emit=emit, loop=None))
    worker.open()  # after the submissions: all three are collected in its first round
    try:
        assert ended.wait(60)
    finally:
        worker.closing.set()
        worker.submit(None)
    endings = {index: (kind, value) for kind, index, value in events if kind in ("end", "error")}
    (expected,) = tiny.generate("Tom", max_new_tokens=20, temperature=0)
    assert endings[1][0] == "error"
    assert [endings[i][0] for i in (0, 2)] == ["end", "end"]
    assert endings[0][1].text == endings[2][1].text == expected.text


@pytest.mark.parametrize("content", [
    b'{"prompt": "\\ud800 and then", "max_tokens": 2}',  # a lone high surrogate in the prompt
    b'{"prompt": "x", "echo": true, "stop": "\\udfff"}',
    b'{"\\ud800": 1}',  # in a key: the "unknown field" error used to repeat it
    b'{"prompt": "x", "model": "\\udc00"}',  # the "no such model" error used to repeat it
    b'{"prompt": ["ok", "\\ud83d"]}',  # half of a pair
], ids=["prompt", "stop", "key", "model", "half-pair"])
def test_unpaired_surrogate_escapes_are_400(content):
    with TestClient(create_app(FakeLanguageModel(), "fake-tiny", max_tokens_limit=16, model_process=False)) as client:
        response = post(client, content)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and "surrogate" in error["message"]


def test_a_surrogate_pair_is_one_character_and_accepted():
    with TestClient(create_app(FakeLanguageModel(), "fake-tiny", max_tokens_limit=16, model_process=False)) as client:
        response = post(client, b'{"prompt": "a \\ud83d\\ude00 b", "max_tokens": 1, "echo": true}')
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"].startswith("a \U0001F600 b")
