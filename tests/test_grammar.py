"""Structured output on the CPU: random walks through the allowed-token masks of the embedded
tokenizer end in text the grammar describes; EOS only once complete; bad specs are invalid_request."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from gpu.models import load_tokenizer
from streamer.grammar import Grammars, GrammarSpec, new_bitmask
from streamer.types import RequestError

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
PATTERN = r"[0-9]{3}-[a-z]{2}"


@pytest.fixture(scope="module")
def smollm2():
    tok = load_tokenizer("smollm2")
    return tok, Grammars(tok)


def allowed_ids(row) -> list[int]:
    words = np.asarray(row).view(np.uint32)
    return np.nonzero(((words[:, None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(-1))[0].tolist()


def walk(tok, grammars, spec, seed, complete, max_tokens=200) -> str:
    """Random allowed tokens until the matcher is done; at every step EOS is in the mask exactly
    when ``complete(text so far)``. After 20 tokens, half the picks prefer a closing token
    ('"', '}', ']', EOS) so that JSON walks end within the budget."""
    matcher = grammars.compile(spec).matcher()
    mask = new_bitmask(1, grammars.vocab_size)
    rng = random.Random(seed)
    eos = tok.eos_token_id
    closers = {tok.convert_tokens_to_ids(c) for c in '"}]'} | {eos}
    ids: list[int] = []
    for _ in range(max_tokens):
        matcher.fill(mask[0])
        allowed = allowed_ids(mask[0])
        text = tok.decode(ids, clean_up_tokenization_spaces=False)
        assert (eos in allowed) == matcher.eos_allowed == complete(text), (text, matcher.eos_allowed)
        if matcher.done:
            assert allowed == [eos], text
            return text
        ends = [t for t in allowed if t in closers]
        pick = rng.choice(ends if ends and len(ids) >= 20 and rng.random() < 0.5 else allowed)
        assert matcher.accept(pick)
        if pick == eos:
            assert matcher.done
            return text
        ids.append(pick)
    raise AssertionError(f"not done after {max_tokens} tokens: {tok.decode(ids)!r}")


def loads(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def outside_strings(text: str) -> str:
    out, in_string, escaped = [], False, False
    for c in text:
        if in_string:
            escaped, in_string = (not escaped and c == "\\"), in_string and (escaped or c != '"')
        elif c == '"':
            in_string = True
        else:
            out.append(c)
    return "".join(out)


def fits_schema(obj) -> bool:
    return (isinstance(obj, dict) and set(obj) == {"name", "age"} and isinstance(obj["name"], str)
            and len(obj["name"]) <= 8 and isinstance(obj["age"], int) and not isinstance(obj["age"], bool))


@pytest.mark.parametrize("seed", range(3))
def test_json_object_walk_ends_in_one_compact_object(smollm2, seed):
    tok, grammars = smollm2
    text = walk(tok, grammars, GrammarSpec("json_object"), seed, lambda t: isinstance(loads(t), dict))
    assert isinstance(json.loads(text), dict)
    assert not re.search(r"\s", outside_strings(text)), text


def test_json_object_walks_are_not_all_empty(smollm2):
    tok, grammars = smollm2
    texts = [walk(tok, grammars, GrammarSpec("json_object"), s, lambda t: isinstance(loads(t), dict)) for s in range(3)]
    assert any(json.loads(t) for t in texts), texts


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_walk_fits_the_schema(smollm2, seed):
    tok, grammars = smollm2
    text = walk(tok, grammars, GrammarSpec("json_schema", json.dumps(SCHEMA)), seed, lambda t: fits_schema(loads(t)))
    assert fits_schema(json.loads(text)), text
    assert not re.search(r"\s", outside_strings(text)), text


@pytest.mark.parametrize("seed", range(3))
def test_regex_walk_matches(smollm2, seed):
    tok, grammars = smollm2
    text = walk(tok, grammars, GrammarSpec("regex", PATTERN), seed, lambda t: re.fullmatch(PATTERN, t) is not None)
    assert re.fullmatch(PATTERN, text), text


def test_lark_walk(smollm2):
    tok, grammars = smollm2
    texts = {walk(tok, grammars, GrammarSpec("lark", 'start: "yes" | "no" | "maybe"'), s, lambda t: t in ("yes", "no", "maybe"))
             for s in range(6)}
    assert texts <= {"yes", "no", "maybe"} and len(texts) > 1, texts


def test_accept_refuses_tokens_outside_the_mask_and_keeps_its_state(smollm2):
    tok, grammars = smollm2
    matcher = grammars.compile(GrammarSpec("json_schema", json.dumps(SCHEMA))).matcher()
    mask = new_bitmask(1, grammars.vocab_size)
    matcher.fill(mask[0])
    before = allowed_ids(mask[0])
    refused = tok.convert_tokens_to_ids("x")
    assert refused not in before and tok.eos_token_id not in before
    assert not matcher.accept(refused)
    assert not matcher.accept(tok.eos_token_id)
    assert not matcher.eos_allowed and not matcher.done and matcher.error == ""
    matcher.fill(mask[0])
    assert allowed_ids(mask[0]) == before
    for t in tok.encode('{"name":"Al","age":7}', add_special_tokens=False):
        assert not matcher.eos_allowed
        assert matcher.accept(t)
    assert matcher.eos_allowed and matcher.done
    assert not matcher.accept(tok.convert_tokens_to_ids("}"))
    assert matcher.accept(tok.eos_token_id)


def test_matchers_of_one_grammar_are_independent_and_compiles_are_cached(smollm2):
    tok, grammars = smollm2
    spec = GrammarSpec("regex", PATTERN)
    compiled = grammars.compile(spec)
    assert grammars.compile(GrammarSpec("regex", PATTERN)) is compiled
    a, b = compiled.matcher(), compiled.matcher()
    for t in tok.encode("123-ab", add_special_tokens=False):
        assert a.accept(t)
    assert a.done and not b.done and not b.eos_allowed


@pytest.mark.parametrize("kind, value, says", [
    ("json_schema", '{"type": "object",', "not valid JSON"),
    ("json_schema", "[1, 2]", "must be a JSON object"),
    ("json_schema", '{"type": "strin"}', "strin"),
    ("json_schema", '{"not": {"type": "string"}}', "not"),
    ("json_schema", '{"x-guidance": {"lenient": true}, "type": "array", "uniqueItems": true}', "uniqueItems"),
    ("json_schema", '{"type": "string", "format": "uri-reference"}', "uri-reference"),
    ("json_schema", '{"type": "string", "pattern": "(?=a)b"}', "look-around"),
    ("json_schema", '{"$ref": "#/$defs/missing"}', "missing"),
    ("regex", "[0-9", "unclosed character class"),
    ("regex", r"(a)\1", "backreferences"),
    ("lark", "start: foo", "foo"),
    ("xml", "<a/>", "grammar kind"),
    ("json_object", "{}", "takes no value"),
    ("regex", "", "non-empty"),
])
def test_invalid_specs_are_invalid_request(smollm2, kind, value, says):
    _, grammars = smollm2
    with pytest.raises(RequestError) as e:
        grammars.compile(GrammarSpec(kind, value))
    assert e.value.code == "invalid_request"
    assert says in e.value.message and kind in e.value.message, e.value.message


def test_ids_past_the_tokenizer_are_never_allowed():
    tok = load_tokenizer("random:tiny-qwen3")  # 257 ids (256 bytes + EOS); the model's logits are wider
    grammars = Grammars(tok, vocab_size=310)
    assert grammars.vocab_size == 310
    mask = new_bitmask(2, 310)
    assert tuple(mask.shape) == (2, 10)
    matcher = grammars.compile(GrammarSpec("json_object")).matcher()
    rng = random.Random(0)
    for _ in range(40):
        matcher.fill(mask[1].numpy())  # a numpy row works as well as a torch one
        allowed = allowed_ids(mask[1])
        assert allowed and max(allowed) < len(tok), allowed
        pick = rng.choice([t for t in allowed if t != tok.eos_token_id])
        assert matcher.accept(pick)
        if matcher.done:
            break
    assert mask[0].eq(-1).all()  # the other row untouched


def test_a_batch_fill_writes_each_matchers_own_mask_and_frees_rows_without_one(smollm2):
    tok, grammars = smollm2
    matchers = [grammars.compile(GrammarSpec("json_schema", json.dumps(SCHEMA))).matcher(),
                None, grammars.compile(GrammarSpec("regex", PATTERN)).matcher()]
    for token in tok.encode('{"name":"', add_special_tokens=False):
        assert matchers[0].accept(token)
    batch = new_bitmask(3, grammars.vocab_size)
    batch[1] = 0
    grammars.fill(batch, matchers)
    for i in (0, 2):
        one = new_bitmask(1, grammars.vocab_size)
        matchers[i].fill(one[0])
        assert np.array_equal(np.asarray(batch[i]), np.asarray(one[0]))
    assert (np.asarray(batch[1]) == -1).all()
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[2]))
