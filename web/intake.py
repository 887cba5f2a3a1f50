"""Where a request enters, for every door (web/ws.py, web/openai_api.py): the server's own limits
on `max_tokens` and on prompt length, the prompt's token ids, and the submit to the engine. Each
door parses its own wire format; what a request may be is decided here, once."""

from __future__ import annotations

from streamer.handle import EngineHandle
from streamer.request import Generation
from streamer.types import RequestError, SamplingParams
from web.config import WebConfig


def max_tokens(asked: int | None, default: int, cap: int | None) -> int:
    """The request's max_tokens: as asked, or the door's default; never past the server's
    --max-tokens `cap` (asking for more is refused, the default is clipped)."""
    if cap is None:
        return default if asked is None else asked
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > cap:
        raise RequestError("invalid_request", f"max_tokens is at most {cap} on this server")
    return min(default, cap) if asked is None else asked


def prompt_ids(engine: EngineHandle, prompt: str | list[int] | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids of a text prompt, of token ids given as such, or of chat messages (the model's template)."""
    if messages is not None:
        return engine.encode_chat(messages)
    if isinstance(prompt, str):
        # On the event loop: the tokenizer is fast native code and prompts are bounded by the
        # message size, so a worker thread would cost more than it saves.
        return engine.encode_prompt(prompt)
    return list(prompt or ())


def submit(engine: EngineHandle, config: WebConfig | None, ids: list[int], params: SamplingParams, *,
           request_id: str, priority: int, client: str) -> Generation:
    """Refuse a prompt over --max-prompt-tokens, then queue the request (RequestError if refused)."""
    limit = config.max_prompt_tokens if config is not None else None
    if limit is not None and len(ids) > limit:
        raise RequestError("prompt_too_long", f"prompt has {len(ids)} tokens; this server takes at most {limit}")
    return engine.submit(ids, params, request_id=request_id, priority=priority, client=client)
