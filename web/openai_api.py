"""The OpenAI-compatible door: `POST /v1/chat/completions`, `POST /v1/completions` (streamed as
server-sent events or not) and `GET /v1/models`, over the same engine and metrics as /v1/stream.

Registered by web/app.py. Input is validated here; errors use OpenAI's JSON shape and HTTP status.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from quart import Response, request

from streamer.handle import EngineHandle
from streamer.request import merge
from streamer.types import MAX_LOGPROBS, FinishEvent, RequestError, SamplingParams, TokenEvent, check_priority
from web import intake, toolcalls

COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
          "n", "user", "presence_penalty", "frequency_penalty", "logprobs", "priority", "ignore_eos"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                        "parallel_tool_calls"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo"}
# Fields clients often send with their neutral value; anything else is refused, not ignored.
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "echo": False}
MAX_N = 16  # samples one request may ask for
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


def _int_field(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise ApiError("invalid_request", f"'{name}' must be an integer in [{low}, {high}]", name)
    return value


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives each token reports (None: no logprobs). Chat asks with `logprobs`
    true and `top_logprobs`; completions with `logprobs` the number."""
    if not chat:
        return _int_field(body, "logprobs", 0, MAX_LOGPROBS)
    asked = body.get("logprobs")
    if asked is not None and not isinstance(asked, bool):
        raise ApiError("invalid_request", "'logprobs' must be a boolean", "logprobs")
    top = _int_field(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not asked:
        raise ApiError("invalid_request", "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if asked else None


def _params(body: dict, default_max: int, cap: int | None, chat: bool) -> SamplingParams:
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
    logprobs = _logprobs(body, chat)
    try:
        return intake.sampling_params(
            max_tokens=max_tokens,
            # OpenAI's defaults: temperature 1 and top_p 1; null means the default.
            temperature=1.0 if body.get("temperature") is None else body["temperature"],
            top_p=1.0 if body.get("top_p") is None else body["top_p"],
            seed=seed % 2**63 if isinstance(seed, int) and not isinstance(seed, bool) else seed,
            stop=() if stop is None else stop,
            ignore_eos=body.get("ignore_eos", False),  # as vLLM takes it: for benchmarks
            logprobs=logprobs,
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


@dataclass
class Parsed:
    body: dict
    ids: list[int]
    params: SamplingParams
    priority: int
    tools: list[dict]  # the chat's tools, [] when none are offered
    choice: toolcalls.ToolChoice


def _response_format(value: Any) -> tuple[str, str] | None:
    """The grammar `response_format` asks for: json_object, or json_schema (always enforced strictly)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise ApiError("invalid_request", "'response_format.type' must be one of: text, json_object, json_schema",
                       "response_format")
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", "")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ApiError("invalid_request", "'response_format.json_schema' must be an object with a 'schema' object",
                       "response_format.json_schema")
    return ("json_schema", json.dumps(spec.get("schema", {})))


def _chat_prompt(engine: EngineHandle, body: dict) -> tuple[list[int], list[dict], toolcalls.ToolChoice]:
    """The chat's prompt ids, its tools and tool choice. With tools, or tool turns in the history,
    the messages go through web/toolcalls.py; otherwise through the model's template as they are."""
    tools, choice = toolcalls.validate_tools(body.get("tools"), body.get("tool_choice"))
    messages = body.get("messages")
    turns = isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)
    if not tools and not turns:
        return intake.prompt_ids(engine, messages=_chat_messages(messages)), [], choice
    ids = toolcalls.render(engine.tokenizer, toolcalls.normalize_messages(messages),
                           [] if choice.mode == "none" else tools)
    return ids, tools, choice


async def _parse(engine: EngineHandle, config: Any, chat: bool) -> Parsed:
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
    params = _params(body, CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS, getattr(config, "max_tokens", None),
                     chat)
    try:
        priority = check_priority(0 if body.get("priority") is None else body["priority"])
    except RequestError as exc:
        raise ApiError(exc.code, exc.message, "priority") from None
    tools, choice = [], toolcalls.ToolChoice("none")
    try:
        if chat:
            ids, tools, choice = _chat_prompt(engine, body)
        else:
            ids = _prompt_ids(engine, body.get("prompt"))
    except intake.FieldError as exc:
        raise ApiError(exc.code, exc.message, exc.param) from None
    except RequestError as exc:
        raise ApiError(exc.code, exc.message, "messages" if chat else "prompt") from None
    grammar = _response_format(body.get("response_format")) if chat else None
    forced = toolcalls.call_schema(tools, choice)
    if forced is not None:
        if grammar is not None:
            raise ApiError("invalid_request", "'response_format' cannot be combined with a forced tool call",
                           "response_format")
        grammar = toolcalls.call_grammar(forced)
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    return Parsed(body, ids, params, priority, tools if choice.mode != "none" else [], choice)


SEED_STRIDE = 0x9E3779B97F4A7C15  # sample i of a seeded request draws with seed + i * this (mod 2**63)


def _samples(params: SamplingParams, n: int) -> list[SamplingParams]:
    """Each sample's parameters: its own seed stream (sample 0 keeps the request's seed, so n=1
    answers as before); unseeded samples draw independently anyway."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + i * SEED_STRIDE) % 2**63) for i in range(n)]


@dataclass
class Answer:
    """One sample's answer as it arrives."""

    index: int
    text: list[str] = dataclasses.field(default_factory=list)
    tokens: list[TokenEvent] = dataclasses.field(default_factory=list)  # those that carry logprobs
    finish: FinishEvent | None = None


def _chat_logprobs(events: list[TokenEvent], text_of: Callable[[int], str]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        token = text_of(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(ev.token_id, ev.logprobs.logprob),
                         "top_logprobs": [entry(i, v) for i, v in ev.logprobs.top]} for ev in events]}


def _completion_logprobs(events: list[TokenEvent], text_of: Callable[[int], str], offset: int) -> dict:
    """`offset`: how much text the answer had before the first of `events`."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ev in events:
        out["tokens"].append(text_of(ev.token_id))
        out["token_logprobs"].append(ev.logprobs.logprob)
        out["top_logprobs"].append({text_of(i): v for i, v in ev.logprobs.top})
        out["text_offset"].append(offset)
        offset += len(ev.text)
    return out


def _usage(finishes: list[FinishEvent]) -> dict:
    prompt, completion = finishes[0].prompt_tokens, sum(f.completion_tokens for f in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_error(ev: FinishEvent) -> ApiError:
    err = ev.error
    if isinstance(err, RequestError):
        return ApiError(err.code, err.message)
    return ApiError("internal", "internal error")


def _reason(ev: FinishEvent) -> str:
    return "length" if ev.finish_reason == "length" else "stop"


class Samples:
    """A request's n samples: the first is submitted at once, the others after its first event,
    so they find the prompt's KV in the prefix cache instead of computing it again."""

    def __init__(self, engine: EngineHandle, config: Any, ids: list[int], params: SamplingParams, n: int,
                 priority: int, client: str) -> None:
        self.engine, self.config, self.ids, self.priority, self.client = engine, config, ids, priority, client
        self.params = _samples(params, n)
        self.rid = f"oai-{uuid.uuid4().hex[:12]}"
        self.gens: list = [self._submit(0)] + [None] * (n - 1)
        self.error: RequestError | None = None  # a later sample the engine refused

    def _submit(self, i: int):
        return intake.submit(self.engine, self.config, self.ids, self.params[i], request_id=f"{self.rid}/{i}",
                             priority=self.priority, client=self.client)

    def _rest(self) -> None:
        try:
            for i in range(1, len(self.gens)):
                self.gens[i] = self._submit(i)
        except RequestError as exc:
            self.error = exc

    def events(self):
        """(sample, event) until all samples finished; see streamer/request.merge."""
        return merge(self.gens, self._rest if len(self.gens) > 1 else None)

    def close(self) -> None:
        """Leave every sample (those still running are aborted, their KV freed)."""
        for g in self.gens:
            if g is not None:
                g.close()


async def _complete(engine: EngineHandle, config: Any, chat: bool, text_of: Callable[[int], str]) -> Response:
    try:
        parsed = await _parse(engine, config, chat)
        body, params = parsed.body, parsed.params
        n = _int_field(body, "n", 1, MAX_N) or 1
        # Under --policy fair, each remote address is one client (the API key is one for all).
        samples = Samples(engine, config, parsed.ids, params, n, parsed.priority, f"ip:{request.remote_addr}")
    except ApiError as exc:
        return error_response(exc)
    except RequestError as exc:  # the prompt's length, or the engine's refusal
        param = ("messages" if chat else "prompt") if exc.code == "prompt_too_long" else None
        return error_response(ApiError(exc.code, exc.message, param))
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": engine.model_name}
    logprobs = params.logprobs is not None
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = Response(_sse(samples, chat, head, include_usage, text_of if logprobs else None, bool(parsed.tools)),
                            content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        response.timeout = None  # a long answer may stream for minutes
        return response
    answers = [Answer(i) for i in range(n)]
    try:  # leaving (even by cancellation: the client left) aborts every sample
        async for i, ev in samples.events():
            if samples.error is not None:
                return error_response(ApiError(samples.error.code, samples.error.message))
            a = answers[i]
            if isinstance(ev, TokenEvent):
                a.text.append(ev.text)
                if ev.logprobs is not None:
                    a.tokens.append(ev)
            elif ev.finish_reason == "error":
                return error_response(_finish_error(ev), counted=True)
            else:
                a.finish = ev
    finally:
        samples.close()
    if any(a.finish is None for a in answers):
        return error_response(ApiError("internal", "the generation ended without finishing"))
    choices = []
    for a in answers:
        content = "".join(a.text)
        lp = None
        if logprobs:
            lp = _chat_logprobs(a.tokens, text_of) if chat else _completion_logprobs(a.tokens, text_of, 0)
        if chat:
            message, reason = {"role": "assistant", "content": content}, _reason(a.finish)
            if parsed.tools:  # the model may have answered with calls
                message["content"], calls = toolcalls.parse_tool_calls(content)
                if calls:
                    message["tool_calls"], reason = calls, "tool_calls"
            choices.append({"index": a.index, "message": message, "logprobs": lp, "finish_reason": reason})
        else:
            choices.append({"index": a.index, "text": content, "logprobs": lp, "finish_reason": _reason(a.finish)})
    obj = "chat.completion" if chat else "text_completion"
    return {**head, "object": obj, "choices": choices, "usage": _usage([a.finish for a in answers])}


async def _sse(samples: Samples, chat: bool, head: dict, include_usage: bool,
               text_of: Callable[[int], str] | None, tools: bool = False) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per token with text, each naming its sample's index. Tokens
    with no text of their own (part of a character) ride with the next chunk's logprobs. With
    `tools`, each sample's text goes through a web/toolcalls.ToolStream: content as it comes,
    calls as their blocks close."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    n = len(samples.gens)
    answers = [Answer(i) for i in range(n)]
    offsets = [0] * n
    calls = [toolcalls.ToolStream() for _ in range(n)] if tools else None

    def event(payload: dict) -> bytes:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    def chunk(i: int, text: str | None, finish: str | None, first: bool = False, delta: dict | None = None) -> bytes:
        lp = None
        pending = answers[i].tokens
        if text_of is not None and (pending or finish) and not first:
            lp = _chat_logprobs(pending, text_of) if chat else _completion_logprobs(pending, text_of, offsets[i])
            answers[i].tokens = []
        if chat:
            if delta is None:
                delta = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
        return event({**head, "object": obj, "choices": [choice]})

    try:
        if chat:
            for i in range(n):
                yield chunk(i, "", None, first=True)
        async for i, ev in samples.events():
            if samples.error is not None:
                yield event(error_body(samples.error.code, samples.error.message))
                return
            a = answers[i]
            if isinstance(ev, TokenEvent):
                if ev.logprobs is not None:
                    a.tokens.append(ev)
                if ev.text and calls is not None:
                    for delta in calls[i].feed(ev.text):
                        yield chunk(i, None, None, delta=delta)
                elif ev.text:
                    yield chunk(i, ev.text, None)
                    offsets[i] += len(ev.text)
            elif ev.finish_reason == "error":
                # Mid-stream the status line is long gone: the error travels as an event.
                exc = _finish_error(ev)
                yield event(error_body(exc.code, exc.message))
                return
            else:
                a.finish = ev
                reason = _reason(ev)
                if calls is not None:
                    for delta in calls[i].finish():
                        yield chunk(i, None, None, delta=delta)
                    reason = "tool_calls" if calls[i].calls else reason
                yield chunk(i, None if chat else "", reason)
        if include_usage:
            yield event({**head, "object": obj, "choices": [], "usage": _usage([a.finish for a in answers])})
    finally:
        samples.close()
    yield b"data: [DONE]\n\n"


def register(app: Any, engine: EngineHandle, config: Any = None) -> None:
    """`config` is web/config.py's WebConfig: its max_tokens and max_prompt_tokens apply here too."""

    def text_of(token_id: int) -> str:
        return intake.token_text(engine.tokenizer, token_id)

    @app.post("/v1/chat/completions")
    async def chat_completions():
        return await _complete(engine, config, True, text_of)

    @app.post("/v1/completions")
    async def completions():
        return await _complete(engine, config, False, text_of)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "streamer"}]}
