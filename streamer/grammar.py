"""Structured output: a request's JSON object, JSON schema, regex or Lark grammar compiled once per
tokenizer (llguidance), and the per-request `Matcher` that fills the allowed-token bitmask.

The engine core owns one `Grammars`; `compile` may run in a worker thread; a `Matcher` belongs to one
request and is driven by one thread at a time.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf  # not llguidance.torch: importing it runs torch.compile, for seconds
import numpy as np
import torch

from streamer.types import RequestError

KINDS = ("json_object", "json_schema", "regex", "lark")
# Overrides, so a schema's "x-guidance" cannot bring back free whitespace or skip unknown keywords:
# compact JSON lets even a random model close a small object in a few tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":", "lenient": False}
MAX_ERROR = 500  # characters of the library's message passed back to the client


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to. ``value``: "" for json_object, the schema's JSON text
    for json_schema, the pattern for regex, the grammar text for lark (llguidance's Lark dialect)."""

    kind: str
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RequestError("invalid_request", f"grammar kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if not isinstance(self.value, str):
            raise RequestError("invalid_request", f"{self.kind} must be given as a string")
        if (self.kind == "json_object") != (self.value == ""):
            what = "takes no value" if self.kind == "json_object" else "needs a non-empty value"
            raise RequestError("invalid_request", f"{self.kind} {what}")


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """(rows, ceil(vocab_size / 32)) int32 on the CPU, all tokens allowed; pinned when CUDA is
    there, so its copy to the device can be non_blocking."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32, pin_memory=torch.cuda.is_available())


class Grammars:
    """The tokenizer's token trie (built here, once: it takes a while for a large vocabulary) and an
    LRU of compiled grammars. ``vocab_size`` is the model's logits width, which may exceed
    ``len(tokenizer)``: ids past the tokenizer are never allowed."""

    def __init__(self, tokenizer, vocab_size: int | None = None, eos_token_ids=None, cache_size: int = 64) -> None:
        self._vocab_size = vocab_size or len(tokenizer)
        eos = sorted(eos_token_ids) if eos_token_ids else tokenizer.eos_token_id
        info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self._vocab_size, eos_token=eos)
        self._info = info.with_slices(llguidance.LLTokenizer.json_slices())  # faster JSON masks, same sets
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the cache only; compiling runs unlocked
        self._executor = llguidance.LLExecutor()  # fills a step's masks on several threads at once

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def new_bitmask(self, rows: int) -> torch.Tensor:
        return new_bitmask(rows, self._vocab_size)

    def fill(self, bitmask: torch.Tensor, matchers: list[Matcher | None]) -> None:
        """Row i of `bitmask` (from `new_bitmask`) gets matchers[i]'s next-token mask, all at once
        on the executor's threads (the GIL is released); rows of None allow every token."""
        rows = [(m._m, i) for i, m in enumerate(matchers) if m is not None]
        for i, m in enumerate(matchers):
            if m is None:
                bitmask[i] = -1
        assert bitmask.is_contiguous() and bitmask.dtype == torch.int32 and bitmask.shape[1] * 32 >= self._vocab_size
        if rows:
            self._executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar for ``spec``, or RequestError("invalid_request") naming what is wrong."""
        with self._lock:
            if (hit := self._cache.get(spec)) is not None:
                self._cache.move_to_end(spec)
                return hit
        text = _grammar_text(spec)
        check = llguidance.LLMatcher(self._info, text, log_level=0)
        if check.is_error():
            raise RequestError("invalid_request", f"invalid {spec.kind}: {check.get_error()[:MAX_ERROR]}")
        compiled = CompiledGrammar(spec, self._info, text, (self._vocab_size + 31) // 32, frozenset(self._info.eos_tokens))
        with self._lock:
            self._cache[spec] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled


def _grammar_text(spec: GrammarSpec) -> str:
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec.value)
    if spec.kind == "json_object":
        schema = {"type": "object"}
    else:
        try:
            schema = json.loads(spec.value)
        except ValueError as e:
            raise RequestError("invalid_request", f"json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise RequestError("invalid_request", "json_schema must be a JSON object")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:  # a schema the library cannot take options into
        raise RequestError("invalid_request", f"invalid {spec.kind}: {str(e)[:MAX_ERROR]}") from None


class CompiledGrammar:
    """One spec checked against the tokenizer; shared by every request with that spec."""

    def __init__(self, spec: GrammarSpec, info, text: str, words: int, eos: frozenset[int]) -> None:
        self.spec = spec
        self._info = info
        self._text = text
        self._words = words
        self._eos = eos

    def matcher(self) -> Matcher:
        """A matcher of its own (about 0.5 ms for a small schema; the engine builds it in a worker
        thread). Not a deep copy of one shared matcher: copies share lexer state behind a lock, so a
        step's masks then fill one at a time, where independent ones fill on all the executor's
        threads (64 masks: 0.3 ms against 0.9 ms on a 16-core host)."""
        return Matcher(llguidance.LLMatcher(self._info, self._text, log_level=0), self._words, self._eos)


class Matcher:
    """One request's position in its grammar."""

    __slots__ = ("_m", "_words", "_eos")

    def __init__(self, m: llguidance.LLMatcher, words: int, eos: frozenset[int]) -> None:
        self._m = m
        self._words = words
        self._eos = eos

    def fill(self, row) -> None:
        """Write the next token's allowed set into ``row``, a contiguous int32 CPU row (numpy or
        torch) of ceil(vocab_size / 32) words: bit j % 32 of word j // 32 is token j. Once the
        grammar is complete the EOS token(s) are allowed; once done, only they are."""
        if isinstance(row, np.ndarray):
            assert row.dtype == np.int32 and row.flags.c_contiguous, (row.dtype, row.flags)
            ptr, nbytes = row.ctypes.data, row.nbytes
        else:
            assert row.dtype == torch.int32 and row.device.type == "cpu" and row.is_contiguous(), row
            ptr, nbytes = row.data_ptr(), row.numel() * 4
        assert nbytes == self._words * 4, (nbytes, self._words)
        self._m.unsafe_compute_mask_ptr(ptr, nbytes)  # releases the GIL

    def accept(self, token_id: int) -> bool:
        """Advance by ``token_id``; False, with the state unchanged, if the grammar forbids it."""
        if self._m.is_stopped():
            return token_id in self._eos  # the library's try_consume refuses even EOS here
        return self._m.try_consume_tokens([token_id]) == 1

    @property
    def done(self) -> bool:
        """Nothing but EOS may follow (or EOS was accepted)."""
        return self._m.is_stopped()

    @property
    def eos_allowed(self) -> bool:
        """The text so far is complete under the grammar."""
        return self._m.is_accepting()

    @property
    def error(self) -> str:
        """The library's error ("" if none); a matcher in error allows only EOS and is done."""
        return self._m.get_error()
