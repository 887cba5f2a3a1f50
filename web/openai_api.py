"""The OpenAI-compatible door: `POST /v1/chat/completions`, `POST /v1/completions` (streamed as
server-sent events or not) and `GET /v1/models`, over the same engine and metrics as /v1/stream.

Registered by web/app.py. Input is validated here; errors use OpenAI's JSON shape and HTTP status.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from quart import Response, request

from streamer.handle import EngineHandle
from streamer.types import FinishEvent, RequestError, SamplingParams, TokenEvent, check_priority
from web import intake

COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
          "n", "user", "presence_penalty", "frequency_penalty", "logprobs", "priority", "ignore_eos"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo"}
# Fields clients often send with their neutral value; anything else is refused, not ignored.
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "echo": False}
# Our stable error codes (docs/PROTOCOL.md) -> HTTP status and OpenAI error type.
STATUS = {
    "invalid_request": (400, "invalid_request_error"),
    "invalid_json": (400, "invalid_request_error"),
    "unsupported_media_type": (415, "invalid_request_error"),
    "prompt_too_long": (400, "invalid_request_error"),
    "model_not_found": (404, "invalid_request_error"),
    "overloaded": (429, "rate_limit_error"),
    "shutting_down": (503, "server_error"),
    "unavailable": (503, "server_error"),
    "internal": (500, "server_error"),
}
CHAT_MAX_TOKENS = 256  # as /v1/stream
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def error_body(code: str, message: str, param: str | None = None) -> dict:
    kind = STATUS.get(code, (500, "server_error"))[1]
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: ApiError, counted: bool = False) -> Response:
    """`counted`: a generation that failed inside, which the engine counted; web/security.py
    counts every other error answer."""
    status = STATUS.get(exc.code, (500,))[0]
    response = Response(json.dumps(error_body(exc.code, exc.message, exc.param)), status=status,
                        content_type="application/json")
    response.counted = counted
    return response


def _params(body: dict, default_max: int, cap: int | None) -> SamplingParams:
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] != neutral and body[name] is not None:
            raise ApiError("invalid_request", f"'{name}' is only supported as {json.dumps(neutral)}", name)
    try:
        max_tokens = intake.max_tokens(body.get("max_completion_tokens", body.get("max_tokens")), default_max, cap)
    except RequestError as exc:
        raise ApiError(exc.code, exc.message, "max_tokens") from None
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    seed = body.get("seed")
    try:
        return intake.sampling_params(
            max_tokens=max_tokens,
            # OpenAI's defaults: temperature 1 and top_p 1; null means the default.
            temperature=1.0 if body.get("temperature") is None else body["temperature"],
            top_p=1.0 if body.get("top_p") is None else body["top_p"],
            seed=seed % 2**63 if isinstance(seed, int) and not isinstance(seed, bool) else seed,
            stop=() if stop is None else stop,
            ignore_eos=body.get("ignore_eos", False),  # as vLLM takes it: for benchmarks
        )
    except intake.FieldError as exc:
        raise ApiError(exc.code, exc.message, exc.param) from None


def _chat_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI message content may be a string or a list of text parts; we take text only."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("invalid_request", "'messages' must be a non-empty list", "messages")
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError("invalid_request", "only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError("invalid_request", "each message needs a string 'role' and text 'content'", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt_ids(engine: EngineHandle, prompt: Any) -> list[int]:
    """A string, a list of one string, or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if (isinstance(prompt, str) and prompt) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return intake.prompt_ids(engine, prompt)
    raise ApiError("invalid_request", "'prompt' must be a non-empty string or list of token ids "
                   "(one prompt per request)", "prompt")


async def _body() -> dict:
    """The request's JSON object. A body with no Content-Type is read as JSON (as vLLM does)."""
    mimetype = request.mimetype
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ApiError("unsupported_media_type", f"the body must be JSON (Content-Type: application/json), "
                       f"not {mimetype}")
    try:
        body = json.loads(await request.get_data())
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise ApiError("invalid_json", f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the body must be a JSON object")
    return body


async def _parse(engine: EngineHandle, config: Any, chat: bool) -> tuple[dict, list[int], SamplingParams, int]:
    body = await _body()
    unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
    if unknown:
        raise ApiError("invalid_request", f"unsupported field(s): {', '.join(unknown)}", unknown[0])
    if "model" not in body:
        raise ApiError("invalid_request", f"'model' is required; this server serves {engine.model_name!r}", "model")
    if not isinstance(body["model"], str):
        raise ApiError("invalid_request", "'model' must be a string", "model")
    if body["model"] != engine.model_name:
        raise ApiError("model_not_found", f"the model {body['model']!r} does not exist; this server "
                       f"serves {engine.model_name!r}", "model")
    if not isinstance(body.get("stream", False), bool):
        raise ApiError("invalid_request", "'stream' must be a boolean", "stream")
    params = _params(body, CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS, getattr(config, "max_tokens", None))
    try:
        priority = check_priority(0 if body.get("priority") is None else body["priority"])
    except RequestError as exc:
        raise ApiError(exc.code, exc.message, "priority") from None
    try:
        ids = intake.prompt_ids(engine, messages=_chat_messages(body.get("messages"))) if chat else \
            _prompt_ids(engine, body.get("prompt"))
    except RequestError as exc:
        raise ApiError(exc.code, exc.message, "messages" if chat else "prompt") from None
    return body, ids, params, priority


def _choice(chat: bool, text: str | None, finish: str | None, first: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    delta: dict = {}
    if first:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _usage(ev: FinishEvent) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def _finish_error(ev: FinishEvent) -> ApiError:
    err = ev.error
    if isinstance(err, RequestError):
        return ApiError(err.code, err.message)
    return ApiError("internal", "internal error")


async def _complete(engine: EngineHandle, config: Any, chat: bool) -> Response:
    try:
        body, ids, params, priority = await _parse(engine, config, chat)
        # Under --policy fair, each remote address is one client (the API key is one for all).
        gen = intake.submit(engine, config, ids, params, request_id=f"oai-{uuid.uuid4().hex[:12]}", priority=priority,
                            client=f"ip:{request.remote_addr}")
    except ApiError as exc:
        return error_response(exc)
    except RequestError as exc:  # the prompt's length, or the engine's refusal
        param = ("messages" if chat else "prompt") if exc.code == "prompt_too_long" else None
        return error_response(ApiError(exc.code, exc.message, param))
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": engine.model_name}
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = Response(_sse(gen, chat, head, include_usage), content_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})
        response.timeout = None  # a long answer may stream for minutes
        return response
    text, finish = [], None
    async with gen:  # leaving it (even by cancellation: the client left) aborts the request
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
            elif ev.finish_reason == "error":
                return error_response(_finish_error(ev), counted=True)
            else:
                finish = ev
    if finish is None:
        return error_response(ApiError("internal", "the generation ended without finishing"))
    content = "".join(text)
    reason = "length" if finish.finish_reason == "length" else "stop"
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                  "finish_reason": reason}
    else:
        choice = _choice(False, content, reason)
    obj = "chat.completion" if chat else "text_completion"
    return {**head, "object": obj, "choices": [choice], "usage": _usage(finish)}


async def _sse(gen: Any, chat: bool, head: dict, include_usage: bool) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(payload: dict) -> bytes:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    def chunk(choices: list, **extra) -> bytes:
        return event({**head, "object": obj, "choices": choices, **extra})

    async with gen:
        if chat:
            yield chunk([_choice(True, "", None, first=True)])
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                if ev.text:
                    yield chunk([_choice(chat, ev.text, None)])
            elif ev.finish_reason == "error":
                # Mid-stream the status line is long gone: the error travels as an event.
                exc = _finish_error(ev)
                yield event(error_body(exc.code, exc.message))
                return
            else:
                reason = "length" if ev.finish_reason == "length" else "stop"
                yield chunk([_choice(chat, None, reason)] if chat else [_choice(False, "", reason)])
                if include_usage:
                    yield chunk([], usage=_usage(ev))
    yield b"data: [DONE]\n\n"


def register(app: Any, engine: EngineHandle, config: Any = None) -> None:
    """`config` is web/config.py's WebConfig: its max_tokens and max_prompt_tokens apply here too."""

    @app.post("/v1/chat/completions")
    async def chat_completions():
        return await _complete(engine, config, chat=True)

    @app.post("/v1/completions")
    async def completions():
        return await _complete(engine, config, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "streamer"}]}
