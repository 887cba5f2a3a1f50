"""The /v1/stream wire format: parse and validate client frames, build server frames.

Pure functions, no I/O: web/ws.py calls them; anything invalid becomes a `ProtocolError` whose
``code`` goes to the client unchanged, so every code here is part of the documented protocol.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamer.types import FinishEvent, RequestError, SamplingParams, TokenEvent, check_priority
from web import intake

MAX_ID_CHARS = 128
MAX_MESSAGES = 512
GENERATE_FIELDS = frozenset(
    {"type", "id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos",
     "priority", "logprobs", "grammar"}
)
CANCEL_FIELDS = frozenset({"type", "id"})


class ProtocolError(Exception):
    """A client frame we refuse; ``request_id`` is echoed back when the frame carried a usable one."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class Generate:
    id: str
    prompt: str | None  # exactly one of prompt and messages is set
    messages: list[dict[str, str]] | None
    params: SamplingParams
    priority: int = 0


@dataclass(frozen=True)
class Cancel:
    id: str


def parse_frame(data: str | bytes | None, max_tokens: int | None = None) -> Generate | Cancel:
    """Turn one websocket message into a command, or raise `ProtocolError`. `max_tokens` is the
    server's cap on the field (--max-tokens): larger asks are refused, and it lowers the default."""
    if not isinstance(data, str):
        # A binary frame is not JSON text; one code for "this is not a JSON text frame".
        raise ProtocolError("invalid_json", "binary frames are not supported: send JSON text frames")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("invalid_json", f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("unknown_type", "a frame must be a JSON object with a 'type' field")
    # Echo the id in the error only when it is a plausible one, so clients can route the error.
    rid = obj.get("id")
    rid = rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS else None
    kind = obj.get("type")
    if kind == "generate":
        return _parse_generate(obj, rid, max_tokens)
    if kind == "cancel":
        _check_fields(obj, CANCEL_FIELDS, rid)
        return Cancel(_parse_id(obj))
    raise ProtocolError("unknown_type", f"unknown frame type {kind!r}: expected 'generate' or 'cancel'", rid)


def _parse_generate(obj: dict[str, Any], rid: str | None, max_tokens: int | None = None) -> Generate:
    request_id = _parse_id(obj)
    _check_fields(obj, GENERATE_FIELDS, rid)

    def bad(message: str) -> ProtocolError:
        return ProtocolError("invalid_request", message, rid)

    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise bad("give exactly one of 'prompt' (a string) and 'messages' (a list of {role, content})")
    prompt = messages = None
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise bad("prompt must be a non-empty string")
    else:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad("messages must be a non-empty list of {role, content} objects")
        if len(messages) > MAX_MESSAGES:
            raise bad(f"at most {MAX_MESSAGES} messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise bad(f"messages[{i}] must be an object with exactly 'role' and 'content'")
            if not isinstance(m["role"], str) or not isinstance(m["content"], str):
                raise bad(f"messages[{i}].role and .content must be strings")

    # Check JSON types here, so the message names the field and the type that was wrong; the
    # ranges are intake's (shared with the OpenAI door).
    kwargs: dict[str, Any] = {}
    for name in ("max_tokens", "top_k", "logprobs"):
        if name in obj:
            kwargs[name] = _int(obj[name], name, bad)
    for name in ("temperature", "top_p"):
        if name in obj:
            value = obj[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise bad(f"{name} must be a number")
            kwargs[name] = float(value)
    try:
        kwargs["max_tokens"] = intake.max_tokens(kwargs.get("max_tokens"), SamplingParams.max_tokens, max_tokens)
    except RequestError as exc:
        raise bad(exc.message) from None
    if obj.get("seed") is not None:
        kwargs["seed"] = _int(obj["seed"], "seed", bad)
    if "stop" in obj:
        stop = obj["stop"]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("stop must be a list of strings")
        kwargs["stop"] = tuple(stop)
    if "ignore_eos" in obj:
        if not isinstance(obj["ignore_eos"], bool):
            raise bad("ignore_eos must be true or false")
        kwargs["ignore_eos"] = obj["ignore_eos"]
    if obj.get("grammar") is not None:
        kwargs["grammar"] = _grammar(obj["grammar"], bad)
    try:
        params = intake.sampling_params(**kwargs)
        priority = check_priority(obj.get("priority", 0))
    except RequestError as exc:
        raise ProtocolError(exc.code, exc.message, rid) from None
    return Generate(request_id, prompt, messages, params, priority)


def _grammar(value: Any, bad) -> tuple[str, str]:
    """`{"type": "json_object"}`, `{"type": "json_schema", "schema": {...}}`, `{"type": "regex",
    "pattern": "..."}` or `{"type": "lark", "grammar": "..."}` -> SamplingParams.grammar."""
    field = {"json_object": None, "json_schema": "schema", "regex": "pattern", "lark": "grammar"}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in field:
        raise bad("grammar must be an object whose type is one of: " + ", ".join(field))
    name = field[kind]
    if set(value) != {"type"} | ({name} if name else set()):
        raise bad(f"a {kind} grammar takes " + (f"'type' and '{name}'" if name else "only 'type'"))
    if kind == "json_object":
        return (kind, "")
    if kind == "json_schema":
        if not isinstance(value[name], dict):
            raise bad("grammar.schema must be a JSON object")
        return (kind, json.dumps(value[name]))
    if not isinstance(value[name], str) or not value[name]:
        raise bad(f"grammar.{name} must be a non-empty string")
    return (kind, value[name])


def _parse_id(obj: dict[str, Any]) -> str:
    rid = obj.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_CHARS:
        raise ProtocolError("invalid_request", f"id must be a string of 1 to {MAX_ID_CHARS} characters")
    return rid


def _check_fields(obj: dict[str, Any], allowed: frozenset[str], rid: str | None) -> None:
    # Unknown fields are refused rather than ignored: a typo such as "max_token" would otherwise
    # silently run with the default.
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ProtocolError("invalid_request", f"unknown field(s) for {obj['type']!r}: {', '.join(unknown)}", rid)


def _int(value: Any, name: str, bad) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name} must be an integer")
    return value


# Server -> client frames. Timings are rounded to 0.01 ms: finer digits are noise on the wire.


def token_frame(request_id: str, ev: TokenEvent, text_of: Callable[[int], str] | None = None) -> dict[str, Any]:
    """`text_of`: each token id's own text, for the alternatives of a token with logprobs."""
    frame = {"type": "token", "id": request_id, "index": ev.index, "token_id": ev.token_id, "text": ev.text}
    if ev.logprobs is not None and text_of is not None:
        frame["logprob"] = ev.logprobs.logprob
        frame["top_logprobs"] = [{"token_id": i, "text": text_of(i), "logprob": v} for i, v in ev.logprobs.top]
    return frame


def done_frame(request_id: str, ev: FinishEvent) -> dict[str, Any]:
    t = ev.timing
    return {
        "type": "done",
        "id": request_id,
        "finish_reason": ev.finish_reason,
        "usage": {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens},
        "timing": {name: _ms(getattr(t, name)) for name in ("queue_ms", "ttft_ms", "total_ms", "tpot_ms")},
    }


def _ms(value: float | None) -> float | None:
    # A request cancelled before its first token has no TTFT; NaN is not valid JSON, so send null.
    if value is None or not math.isfinite(value):
        return None
    return round(value, 2)


def error_frame(request_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"type": "error", "id": request_id, "code": code, "message": message}
