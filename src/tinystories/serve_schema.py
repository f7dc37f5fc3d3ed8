"""The /v1/completions request: reading the JSON body and checking it field by field.

Every refusal is an `APIError` in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
naming the first bad field. JSON types and OpenAI's own limits are checked here (temperature <= 2,
at most 4 stop strings, 16 choices); the sampling values themselves are checked by building the
library's `SamplingConfig`, so the server accepts exactly what `generate` accepts.

Prompts: a string, a list of strings, a list of token ids, or a list of such lists. A text prompt is
read as `<|endoftext|>` + its tokens, as `generate` reads it; token ids are read as given. A prompt
longer than the context keeps its last `context_length` tokens (usage.prompt_tokens says how many
were read), except when its log-probabilities are asked for (`echo` with `logprobs`): that needs
the whole prompt in one window, so it is refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from tinystories.config import SamplingConfig, SamplingError
from tinystories.decoding import MAX_LOGPROBS

OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions (the library's is SamplingConfig's)
MAX_CHOICES = 16  # prompts x n in one request
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_TEMPERATURE = 2.0  # as OpenAI
MAX_SEED = 2**63 - 1

_OPENAI_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
    "echo", "logprobs", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "user", "suffix",
}
_EXTENSION_FIELDS = {"top_k", "repetition_penalty"}
# SamplingConfig field -> request field, to name the right parameter when SamplingConfig refuses a value
_REQUEST_NAMES = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    """A request the server refuses; becomes `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=headers)


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions request.

    prompts: each a string or a list of token ids. sampling: the library's options; None when
    max_tokens is 0 (echo only: the prompt is scored, nothing is generated). logprobs: None, or how
    many alternatives (0..5) to report with each token's log-probability.
    """

    prompts: list[str | list[int]]
    sampling: SamplingConfig | None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1 here


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(body: dict, name: str, default: int | None, low: int | None = None, high: int | None = None,
             high_reason: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 16.0 is accepted as 16, like OpenAI
    if not _is_integer(value):
        raise invalid(name, f"'{name}' must be an integer, got {json.dumps(value)}", "invalid_type")
    if low is not None and value < low:
        raise invalid(name, f"'{name}' must be at least {low}, got {value}")
    if high is not None and value > high:
        raise invalid(name, f"'{name}' must be at most {high}{high_reason}, got {value}")
    return value


def _number(body: dict, name: str, default: float, high: float | None = None) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise invalid(name, f"'{name}' must be a number, got {json.dumps(value)}", "invalid_type")
    if high is not None and value > high:
        raise invalid(name, f"'{name}' must be at most {high:g}, got {value:g}")
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be true or false, got {json.dumps(value)}", "invalid_type")
    return value


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_integer(item) for item in value)


def _prompts(body: dict, vocab_size: int) -> list[str | list[int]]:
    prompt = body.get("prompt", None)
    if prompt is None:
        raise invalid("prompt", "'prompt' is required: a string, a list of strings or of token ids",
                      "missing_required_parameter")
    if isinstance(prompt, str) or _is_token_list(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_list(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise invalid("prompt", "'prompt' must be a string, a non-empty list of strings, a list of token ids "
                                "or a list of such lists", "invalid_type")
    if len(prompts) > MAX_CHOICES:
        raise invalid("prompt", f"at most {MAX_CHOICES} prompts per request, got {len(prompts)}")
    for tokens in (p for p in prompts if not isinstance(p, str)):
        bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise invalid("prompt", f"token id {bad} is outside this model's vocabulary (0..{vocab_size - 1})")
    return prompts


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(item, str) for item in sequences):
        raise invalid("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(sequences)}")
    if any(item == "" for item in sequences):
        raise invalid("stop", "stop sequences must not be empty strings")
    return tuple(sequences)


def _refuse_unsupported(body: dict) -> None:
    """OpenAI fields this server accepts only at their neutral value."""
    if body.get("suffix") is not None:
        raise invalid("suffix", "'suffix' is not supported by this server", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and (not _is_number(value) or value != 0):
            raise invalid(name, f"'{name}' is not supported (only 0); use 'repetition_penalty' instead",
                          "unsupported_parameter")
    if body.get("logit_bias") not in (None, {}):
        raise invalid("logit_bias", "'logit_bias' is not supported by this server", "unsupported_parameter")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", "'user' must be a string", "invalid_type")


def _check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "'model' must be a string", "invalid_type")
    if model is not None and model != model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")


def _choices(body: dict, prompts: list) -> int:
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    if len(prompts) * n > MAX_CHOICES:
        raise invalid("n", f"prompts x n must be at most {MAX_CHOICES}, got {len(prompts)} x {n}")
    best_of = _integer(body, "best_of", None, 1, MAX_CHOICES)
    if best_of is not None and best_of != n:
        raise invalid("best_of", "'best_of' is not supported (it may only equal n)", "unsupported_parameter")
    return n


def _stream_options(body: dict, stream: bool) -> bool:
    """include_usage, from stream_options (allowed only with stream)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise invalid("stream_options", "'stream_options' must be an object like {\"include_usage\": true}",
                      "invalid_type")
    return _boolean(options, "include_usage", False)


def _sampling(body: dict, max_tokens: int) -> SamplingConfig:
    """The library's SamplingConfig from the request: its rules decide what is valid (including what the
    engine's int64 / float32 option tensors can hold; it treats a top_k beyond the vocabulary as all)."""
    try:
        return SamplingConfig(
            max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, MAX_TEMPERATURE),
            top_k=_integer(body, "top_k", 0), top_p=_number(body, "top_p", 1.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0),
            seed=_integer(body, "seed", None, 0, MAX_SEED), stop=_stop(body))
    except SamplingError as error:
        field = str(error).split()[0]
        raise invalid(_REQUEST_NAMES.get(field, field), str(error)) from None


def parse_completion_request(body: Any, model_name: str, max_tokens_limit: int, vocab_size: int) -> CompletionRequest:
    """Check a decoded /v1/completions body. Raises `APIError` naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    unknown = sorted(set(body) - _OPENAI_FIELDS - _EXTENSION_FIELDS)
    if unknown:
        raise invalid(unknown[0], f"unrecognized request argument supplied: {unknown[0]}", "unknown_parameter")
    _check_model(body, model_name)
    _refuse_unsupported(body)
    prompts = _prompts(body, vocab_size)
    n = _choices(body, prompts)
    stream = _boolean(body, "stream", False)
    echo = _boolean(body, "echo", False)
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = _integer(body, "max_tokens", min(OPENAI_DEFAULT_MAX_TOKENS, max_tokens_limit), 0 if echo else 1,
                          max_tokens_limit, " (this server's max_tokens limit)")
    sampling = _sampling(body, max(max_tokens, 1))
    return CompletionRequest(prompts=prompts, sampling=sampling if max_tokens else None, n=n, stream=stream,
                             include_usage=_stream_options(body, stream), echo=echo, logprobs=logprobs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A JSON string may spell a UTF-16 surrogate ("\\ud800"); alone it is no Unicode text, and any answer
# that repeats it (an echo, an error naming a field) could not be encoded as UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(value: Any) -> bool:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


async def read_json_body(request: Request, max_body_bytes: int) -> Any:
    """The request's JSON body, refusing a wrong content type (415), a large body (413) or bad JSON (400)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r} "
                            "(e.g. curl -H 'Content-Type: application/json')", code="unsupported_media_type")
    too_large = APIError(413, f"request body is larger than {max_body_bytes} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header", code="invalid_header")
        if int(declared) > max_body_bytes:
            raise too_large
    body = bytearray()
    async for piece in request.stream():  # also bounds chunked bodies, which declare no length
        body += piece
        if len(body) > max_body_bytes:
            raise too_large
    try:
        text = body.decode("utf-8")
        decoded = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8", code="invalid_json") from None
    except (ValueError, RecursionError) as error:
        raise APIError(400, f"request body is not valid JSON ({error})", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(decoded):  # pairs (emoji) are fine
        raise APIError(400, "request body has a string with an unpaired UTF-16 surrogate escape (like \\ud800): "
                            "not Unicode text", code="invalid_json")
    return decoded
