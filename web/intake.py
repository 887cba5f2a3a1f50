"""Where a request enters, for every door (web/ws.py, web/openai_api.py): the server's own limits
on `max_tokens` and on prompt length, the sampling parameters, the chat roles, the prompt's token
ids, and the submit to the engine. Each door parses its own wire format; what a request may be is
decided here, once."""

from __future__ import annotations

from functools import lru_cache

from streamer.handle import EngineHandle
from streamer.request import Generation
from streamer.types import RequestError, SamplingParams
from web.config import WebConfig

MAX_TEMPERATURE = 2.0  # OpenAI's bound: past it, sampling is noise
ROLES = ("system", "user", "assistant")  # what every chat template we serve renders


class FieldError(RequestError):
    """A request field whose value is refused; `param` names the field (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__("invalid_request", message)
        self.param = param


def max_tokens(asked: int | None, default: int, cap: int | None) -> int:
    """The request's max_tokens: as asked, or the door's default; never past the server's
    --max-tokens `cap` (asking for more is refused, the default is clipped)."""
    if cap is None:
        return default if asked is None else asked
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > cap:
        raise RequestError("invalid_request", f"max_tokens is at most {cap} on this server")
    return min(default, cap) if asked is None else asked


def sampling_params(**fields) -> SamplingParams:
    """SamplingParams from the fields a request gave (FieldError naming the first one refused)."""
    try:
        params = SamplingParams(**fields)
    except RequestError:
        for name, value in fields.items():  # which field: each alone, only once something failed
            try:
                SamplingParams(**{name: value})
            except RequestError as exc:
                raise FieldError(name, exc.message) from None
        raise
    if params.temperature > MAX_TEMPERATURE:
        raise FieldError("temperature", f"temperature must be at most {MAX_TEMPERATURE:g}")
    return params


def prompt_ids(engine: EngineHandle, prompt: str | list[int] | None = None, messages: list[dict] | None = None) -> list[int]:
    """Token ids of a text prompt, of token ids given as such, or of chat messages (the model's template)."""
    if messages is not None:
        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise FieldError("messages", f"messages[{i}].role must be one of: {', '.join(ROLES)}")
        return engine.encode_chat(messages)
    if isinstance(prompt, str):
        # On the event loop: the tokenizer is fast native code and prompts are bounded by the
        # message size, so a worker thread would cost more than it saves.
        return engine.encode_prompt(prompt)
    return list(prompt or ())


@lru_cache(maxsize=1 << 16)
def token_text(tokenizer, token_id: int) -> str:
    """A token id's own text, as logprobs entries name it (cached: the same ids recur)."""
    return tokenizer.decode([token_id])


def submit(engine: EngineHandle, config: WebConfig | None, ids: list[int], params: SamplingParams, *,
           request_id: str, priority: int, client: str) -> Generation:
    """Refuse a prompt over --max-prompt-tokens, then queue the request (RequestError if refused)."""
    limit = config.max_prompt_tokens if config is not None else None
    if limit is not None and len(ids) > limit:
        raise RequestError("prompt_too_long", f"prompt has {len(ids)} tokens; this server takes at most {limit}")
    return engine.submit(ids, params, request_id=request_id, priority=priority, client=client)
