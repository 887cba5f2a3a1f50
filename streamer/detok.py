"""Incremental detokenization and stop strings for one request.

Deltas never split a UTF-8 character and concatenate to exactly
``tokenizer.decode(ids, skip_special_tokens=True)``. With stop strings, the last few characters
are held back until it is certain they do not begin a stop string.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust backend decodes exactly as `tokenizer.decode(ids,
        # skip_special_tokens=True, clean_up_tokenization_spaces=False)`, without the Python layers.
        self._backend = getattr(tokenizer, "_tokenizer", None)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        # Decode windows start a few tokens back so word-boundary rules (leading spaces) apply.
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.first_output = len(self.ids)
        self._prefix: str | None = None  # decode of ids[prefix_offset:read_offset], while they stay put
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that may be sent now ("" if none yet)."""
        self.ids.append(token_id)
        if self._prefix is None:  # the window's start moved: decode its fixed part once
            self._prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        prefix = self._prefix
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._prefix = None
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of the generation."""
        if not self.stopped:
            full = self._decode(self.ids[self.first_output :])
            if full.startswith(self.text):
                self.text = full  # e.g. a trailing incomplete character becomes U+FFFD
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        if self.stop:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
