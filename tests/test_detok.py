"""Incremental detokenization: emoji, CJK and accented text stream without split characters, and
the deltas concatenate to exactly the tokenizer's decode of all ids."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from gpu.models import byte_tokenizer
from streamer.detok import Detokenizer

TEXTS = [
    "Crème brûlée, naïve façade, Ångström, São Paulo.",
    "今日は良い天気ですね。我们去公园散步吧！한국어도 있어요.",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✨ sparkles ✨",
    "Mixed: naïve 日本 😀 end",
]


@pytest.fixture(scope="module", params=["smollm2", "bytes"])
def tokenizer(request, smollm2_dir):
    if request.param == "bytes":
        return byte_tokenizer()
    return AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)


def stream(tokenizer, ids, prompt=(), stop=()):
    d = Detokenizer(tokenizer, list(prompt), stop)
    deltas = [d.add(t) for t in ids]
    deltas.append(d.finish())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode_and_never_split_a_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("User says:", add_special_tokens=False)
    deltas = stream(tokenizer, ids, prompt)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) > 1  # it really streams


def test_multibyte_characters_wait_for_their_last_byte():
    tok = byte_tokenizer()
    ids = tok.encode("é😀", add_special_tokens=False)  # 2 + 4 bytes, one token each
    assert len(ids) == 6
    assert stream(tok, ids) == ["", "é", "", "", "", "😀", ""]


def test_special_tokens_are_not_text(tokenizer):
    ids = tokenizer.encode("ok", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, ids)) == "ok"


def test_stop_string_spanning_tokens_is_held_back_and_cut():
    tok = byte_tokenizer()
    ids = tok.encode("hello STOP world", add_special_tokens=False)
    deltas = stream(tok, ids, stop=("STOP",))
    assert "".join(deltas) == "hello "
    assert not any("S" in d for d in deltas)


def test_incomplete_character_at_the_end_is_flushed_as_decode_does():
    tok = byte_tokenizer()
    ids = tok.encode("a😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    assert "".join(stream(tok, ids)) == tok.decode(ids)
