"""Incremental detokenization and stop strings, one request at a time (`Detokenizer.add`) or for a
whole step's tokens at once (`add_batch`); the step loop calls it.

Deltas never split a UTF-8 character and concatenate to exactly
``tokenizer.decode(ids, skip_special_tokens=True)``. With stop strings, the last few characters
are held back until it is certain they do not begin a stop string.
"""

from __future__ import annotations

import functools

REPLACEMENT = "\ufffd"


@functools.lru_cache(maxsize=8)
def _silent_ids(backend) -> tuple[int, frozenset[int]]:
    """(limit, special): ids >= limit name no token and special ids are skipped, so the Rust
    decode drops them before its decoder runs: in any context they add no text and change none."""
    limit = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    return limit, special


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        # A fast tokenizer's Rust backend decodes exactly as `tokenizer.decode(ids,
        # skip_special_tokens=True, clean_up_tokenization_spaces=False)`, without the Python layers.
        self._backend = getattr(tokenizer, "_tokenizer", None)
        # Ids the backend decodes to nothing wherever they stand stay out of the decode windows
        # (a random-weights model emits mostly those: the window would grow with every token).
        self._limit, self._special = _silent_ids(self._backend) if self._backend is not None else (1 << 62, frozenset())
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

    def _silent(self, token_id: int) -> bool:
        return token_id >= self._limit or token_id in self._special

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that may be sent now ("" if none yet)."""
        if self._silent(token_id):
            return self._release(final=False)
        self.ids.append(token_id)
        if self._prefix is None:  # the window's start moved: decode its fixed part once
            self._prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return self._take(self._decode(self.ids[self.prefix_offset :]))

    def _take(self, full: str) -> str:
        """Given the decode of the window ids[prefix_offset:], take its new text once it ends on a
        whole character, and release what may be sent."""
        prefix = self._prefix
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


def add_batch(pairs: list[tuple[Detokenizer, int]]) -> list[str]:
    """Feed each pair's token to its detokenizer, in order; their deltas, exactly as `add` would
    give them one at a time. A detokenizer may come more than once (a front end that fell behind
    gets several steps of a request in one frame): its k-th token goes in the k-th pass.

    In a pass the decode windows are gathered first and decoded together: each window one Rust
    `decode` call (one `decode_batch` for all of them, through the tokenizers' thread pool, gained
    nothing). Detokenizers without the first one's Rust backend decode one by one."""
    rounds = passes([id(d) for d, _ in pairs])
    if len(rounds) <= 1:
        return _add_once(pairs)
    deltas = [""] * len(pairs)
    for indices in rounds:
        for i, delta in zip(indices, _add_once([pairs[i] for i in indices]), strict=True):
            deltas[i] = delta
    return deltas


def passes(keys: list) -> list[list[int]]:
    """The indices of `keys` split into passes: pass k holds, in order, each key's k-th
    occurrence. One pass (all of them) when no key repeats."""
    if len(set(keys)) == len(keys):
        return [list(range(len(keys)))]
    seen: dict = {}
    out: list[list[int]] = []
    for i, key in enumerate(keys):
        k = seen.get(key, 0)
        seen[key] = k + 1
        if k == len(out):
            out.append([])
        out[k].append(i)
    return out


def _add_once(pairs: list[tuple[Detokenizer, int]]) -> list[str]:
    """`add_batch` of pairs whose detokenizers are all different."""
    backend = pairs[0][0]._backend if pairs else None
    if backend is None:
        return [d.add(t) for d, t in pairs]
    windows: list[list[int]] = []  # per decoded detokenizer: its prefix window if needed, its full window
    decoded: list[bool] = []  # per pair: whether its windows are in `windows`
    for d, t in pairs:
        if d._backend is not backend or t >= d._limit or t in d._special:
            decoded.append(False)
            continue
        ids = d.ids
        ids.append(t)
        if d._prefix is None:
            windows.append(ids[d.prefix_offset : d.read_offset])
        windows.append(ids[d.prefix_offset :])
        decoded.append(True)
    decode = backend.decode
    texts = iter([decode(w, True) for w in windows])
    deltas = []
    for (d, t), done in zip(pairs, decoded, strict=True):
        if not done:
            deltas.append(d.add(t))  # a silent id (add decodes nothing), or another backend
            continue
        if d._prefix is None:
            d._prefix = next(texts)
        deltas.append(d._take(next(texts)))
    return deltas
