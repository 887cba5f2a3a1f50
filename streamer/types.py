"""Values that cross the engine's edge: sampling parameters, request errors and stream events.

Frozen dataclasses, validated in ``__post_init__``; the web layer builds them from client input
and turns `RequestError` into error frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple


class RequestError(Exception):
    """A request the engine refuses, with a stable machine-readable ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


PRIORITY_MIN, PRIORITY_MAX = -10, 10
GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "lark")  # what SamplingParams.grammar may constrain with
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_LOGPROBS = 20  # top alternatives a token may carry (OpenAI's top_logprobs bound)  # request priority classes; higher runs first under --policy priority


def check_priority(value: object) -> int:
    """A request's priority class, or RequestError("invalid_request")."""
    if isinstance(value, bool) or not isinstance(value, int) or not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise RequestError("invalid_request", f"priority must be an integer in [{PRIORITY_MIN}, {PRIORITY_MAX}]")
    return value


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and its top k alternatives
    grammar: tuple[str, str] | None = None  # (kind, text): the output must match it (streamer/grammar.py)

    def __post_init__(self) -> None:
        def bad(msg: str):
            raise RequestError("invalid_request", msg)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad("max_tokens must be an integer >= 1")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                bad(f"{name} must be a finite number")
        if self.temperature < 0:
            bad("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p must be in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k must be an integer >= 0")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63):
            bad("seed must be an integer in [0, 2**63)")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop must be a list of non-empty strings")
        if len(self.stop) > 16:
            bad("at most 16 stop strings")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos must be a boolean")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}]")
        if self.grammar is not None:
            g = self.grammar
            if not (isinstance(g, tuple) and len(g) == 2 and g[0] in GRAMMAR_KINDS and isinstance(g[1], str)):
                bad(f"grammar must be (kind, text) with kind one of: {', '.join(GRAMMAR_KINDS)}")
            if len(g[1]) > MAX_GRAMMAR_CHARS:
                bad(f"a grammar, schema or pattern is at most {MAX_GRAMMAR_CHARS} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class Logprobs(NamedTuple):
    """A sampled token's log-probability under the model (the log-softmax of its raw logits,
    before temperature, top-k or top-p), and the `top` (id, log-probability) pairs, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


class TokenEvent(NamedTuple):
    """One generated token; ``text`` is the new decoded text (may be "" mid-character);
    ``logprobs`` only where the request asked for them.

    Immutable like the other events, but a named tuple: one is made per token, and a frozen
    dataclass costs about 3x as much to build (~0.3 us a token)."""

    index: int
    token_id: int
    text: str
    logprobs: Logprobs | None = None


@dataclass(frozen=True)
class Timing:
    """Milliseconds since the engine accepted the request; None where it never happened
    (a request cancelled while queued has no queue_ms, one with no token no ttft_ms)."""

    queue_ms: float | None
    ttft_ms: float | None
    total_ms: float
    tpot_ms: float | None


@dataclass(frozen=True)
class FinishEvent:
    """The last event of every generation."""

    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    timing: Timing
    error: RequestError | None = field(default=None)
