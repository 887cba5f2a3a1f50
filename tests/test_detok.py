"""Incremental detokenization: emoji, CJK and accented text stream without split characters, and
the deltas concatenate to exactly the tokenizer's decode of all ids; a step's tokens detokenized
together (`add_batch`) give exactly the deltas of one `add` at a time."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer

from gpu.models import byte_tokenizer
from streamer.detok import Detokenizer, add_batch

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


def byte_fallback_tokenizer():
    """A Llama-2-style tokenizer: sentencepiece pieces, <0xNN> byte tokens for the rest, and a
    decoder that strips the text's leading space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "▁the", "▁a", "▁hello", "é", "▁caf", "日本", "▁world", "s", "t", "▁STOP"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


WORDS = ["hello", " world", " the", " a", " café", " naïve", " 日本", "語", " 😀", "👍🏽", " STOP", "\n\n", " x", "s", "t"]


def text_stream(tokenizer, rng: random.Random) -> list[int]:
    """Ids of random text (multi-byte characters split over byte tokens), with special ids and ids
    beyond the vocabulary (both decode to nothing) mixed in anywhere, even inside a character."""
    ids = tokenizer.encode("".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 30))), add_special_tokens=False)
    for _ in range(rng.randrange(4)):
        ids.insert(rng.randrange(len(ids) + 1), rng.choice([tokenizer.eos_token_id, len(tokenizer) + rng.randrange(1000)]))
    return ids


def random_stream(tokenizer, rng: random.Random) -> list[int]:
    """Any ids at all, invalid UTF-8 included."""
    return [rng.randrange(len(tokenizer) + 10) for _ in range(rng.randrange(1, 40))]


def batched(tokenizer, streams, prompt, stop) -> list[list[str]]:
    """Each stream as one request; every step, one add_batch for the requests still going."""
    dets = [Detokenizer(tokenizer, prompt, stop) for _ in streams]
    out: list[list[str]] = [[] for _ in streams]
    for step in range(max(map(len, streams))):
        live = [i for i, s in enumerate(streams) if step < len(s)]
        deltas = add_batch([(dets[i], streams[i][step]) for i in live])
        for i, delta in zip(live, deltas, strict=True):
            out[i].append(delta)
    for o, d in zip(out, dets, strict=True):
        o.append(d.finish())
    return out


@pytest.mark.parametrize("name", ["smollm2", "bytes", "byte-fallback"])
@pytest.mark.parametrize("stop", [(), ("STOP", "\n\n")])
def test_batched_deltas_equal_one_add_at_a_time(name, stop, smollm2_dir):
    tokenizer = {"smollm2": lambda: AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True),
                 "bytes": byte_tokenizer, "byte-fallback": byte_fallback_tokenizer}[name]()
    rng = random.Random(f"{name}{stop}")
    # Its decoder strips the text's first space, which a prompt before the output keeps.
    prompt = [] if name == "byte-fallback" else [5, 6, 7, 8]
    for _ in range(10):
        valid = [text_stream(tokenizer, rng) for _ in range(12)]
        # The byte-fallback decoder turns a whole run of byte tokens into U+FFFDs once one is
        # invalid, so no incremental decode can match it on random ids: they check add_batch only.
        streams = valid + [random_stream(tokenizer, rng) for _ in range(12)]
        got = batched(tokenizer, streams, prompt, stop)
        assert got == [stream(tokenizer, s, prompt, stop) for s in streams]
        for ids, deltas in zip(streams if name != "byte-fallback" else valid, got, strict=False):
            full = tokenizer.decode(ids, skip_special_tokens=True)
            cut = min([i for i in (full.find(s) for s in stop) if i >= 0], default=len(full))
            assert "".join(deltas) == full[:cut]


def test_ids_that_decode_to_nothing_are_left_out_of_the_windows_without_changing_a_delta():
    tok = byte_tokenizer()
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.choice([rng.randrange(257), rng.randrange(257, 151936)]) for _ in range(rng.randrange(1, 40))]
        lean, full = Detokenizer(tok, []), Detokenizer(tok, [])
        full._limit, full._special = 1 << 62, frozenset()  # every id goes into the windows
        assert [lean.add(t) for t in ids] + [lean.finish()] == [full.add(t) for t in ids] + [full.finish()]
        assert len(lean.ids) == sum(t < 256 for t in ids)


def test_add_batch_of_nothing():
    assert add_batch([]) == []


def test_one_detokenizer_twice_in_a_batch_gets_its_tokens_in_order(smollm2_dir):
    """A front end that falls behind gets two steps of a request in one frame: add_batch then holds
    the same detokenizer twice, and must give the deltas of two adds in a row."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    rng = random.Random(3)
    for _ in range(20):
        streams = [text_stream(tokenizer, rng) for _ in range(6)]
        dets = [Detokenizer(tokenizer, [5, 6]) for _ in streams]
        out: list[list[str]] = [[] for _ in streams]
        pos = [0] * len(streams)
        while any(p < len(s) for p, s in zip(pos, streams, strict=True)):
            pairs, who = [], []
            for _ in range(rng.randrange(1, 4)):  # up to three steps' tokens in one frame, step by step
                for i, s in enumerate(streams):
                    if pos[i] < len(s) and rng.random() < 0.8:
                        pairs.append((dets[i], s[pos[i]]))
                        who.append(i)
                        pos[i] += 1
            for i, delta in zip(who, add_batch(pairs), strict=True):
                out[i].append(delta)
        for o, d in zip(out, dets, strict=True):
            o.append(d.finish())
        assert out == [stream(tokenizer, s, [5, 6], ()) for s in streams]
