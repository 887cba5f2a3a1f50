"""Prompts to token ids: plain text, or chat messages rendered with the model's chat template.
Used where requests enter: the in-process engine and the front ends' engine client."""

from __future__ import annotations

from streamer.types import RequestError


def encode_prompt(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("invalid_request", "messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError("invalid_request", "each message needs a string 'role' and 'content'")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:  # a template that rejects the roles, say
        raise RequestError("invalid_request", f"chat template failed: {exc}") from None
    return list(ids)


def check_prompt(ids: list[int], vocab_size: int, capacity: int, limits: str) -> None:
    """Refuse a prompt the engine cannot take: empty, ids outside the vocabulary, or no room for
    one token more within `capacity` (`limits` says what bounds it, for the message)."""
    if not ids:
        raise RequestError("invalid_request", "the prompt is empty")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise RequestError("invalid_request", f"token ids must be integers in [0, {vocab_size})")
    if len(ids) >= capacity:
        raise RequestError("prompt_too_long",
                           f"prompt has {len(ids)} tokens; this server takes at most {capacity - 1} ({limits})")
