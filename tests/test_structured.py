"""Structured output through the engine: answers under a grammar parse and match it, with the
step loop overlapped (masks deferred until the token in flight is known) or not; requests without
a grammar get the tokens they get alone; bad grammars and cancels leave no KV behind."""

from __future__ import annotations

import json
import re

import pytest
import trio

from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.types import RequestError, SamplingParams, TokenEvent

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


async def answer(gen) -> tuple[str, list[int], str, RequestError | None]:
    text, ids = "", []
    async with gen:
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                text += ev.text
                ids.append(ev.token_id)
            else:
                return text, ids, ev.finish_reason, ev.error
    raise AssertionError("no finish")


async def all_answers(gens) -> list:
    out = [None] * len(gens)

    async def one(i):
        out[i] = await answer(gens[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(gens)):
            nursery.start_soon(one, i)
    return out


def check_schema(obj) -> None:
    assert set(obj) == {"name", "age", "tags"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool)
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 6 for t in obj["tags"])


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
async def test_schemad_answers_from_random_weights_parse_and_validate(overlap):
    config = EngineConfig(model="random:tiny-qwen3", kv_memory=0.05, max_batch_tokens=128, overlap=overlap)
    schema = SamplingParams(max_tokens=200, temperature=0.8, seed=3, grammar=("json_schema", json.dumps(SCHEMA)))
    with trio.fail_after(120):
        async with open_engine(config) as engine:
            deferred = []  # steps whose sampling waited for masks of the tokens in flight
            sample_deferred = engine.runner.sample_deferred
            engine.runner.sample_deferred = lambda launched, bitmask: (deferred.append(bitmask is not None),
                                                                      sample_deferred(launched, bitmask))
            prompts = [[7, 8, 9, i] for i in range(6)]
            gens = [engine.submit(p, SamplingParams(max_tokens=200, temperature=0.8, seed=i,
                                                    grammar=schema.grammar)) for i, p in enumerate(prompts)]
            gens.append(engine.submit([1, 2, 3], SamplingParams(max_tokens=40, grammar=("regex", r"[0-9]{3}-[a-z]{2}"))))
            gens.append(engine.submit([1, 2, 4], SamplingParams(max_tokens=40, grammar=("json_object", ""))))
            got = await all_answers(gens)
            assert engine.statistics().kv.used_blocks == 0 and engine.live_requests == 0
    assert (len(deferred) > 10 and all(deferred)) if overlap else not deferred
    for text, _, reason, error in got[:6]:
        assert error is None and reason == "stop", (text, reason, error)
        check_schema(json.loads(text))
        assert not re.search(r'[:,]\s|\s[:,{}\[\]]', re.sub(r'"(\\.|[^"\\])*"', '""', text))  # compact JSON
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", got[6][0]) and got[6][2] == "stop"
    assert isinstance(json.loads(got[7][0]), dict) and got[7][2] == "stop"


async def test_requests_without_a_grammar_get_the_tokens_they_get_alone():
    config = EngineConfig(model="random:tiny-qwen3", kv_memory=0.05, max_batch_tokens=128)
    free = SamplingParams(max_tokens=24, ignore_eos=True)
    with trio.fail_after(120):
        async with open_engine(config) as engine:
            (alone,) = await all_answers([engine.submit([5, 6, 7], free)])
            mixed = await all_answers([engine.submit([5, 6, 7], free)] + [
                engine.submit([9, i], SamplingParams(max_tokens=60, temperature=1.0, grammar=("json_object", "")))
                for i in range(4)])
    assert mixed[0][1] == alone[1]


async def test_a_bad_grammar_is_an_invalid_request_and_a_cancel_while_compiling_frees_all():
    config = EngineConfig(model="random:tiny-qwen3", kv_memory=0.05, max_batch_tokens=128)
    with trio.fail_after(120):
        async with open_engine(config) as engine:
            bad = await all_answers([
                engine.submit([1, 2], SamplingParams(grammar=("json_schema", "{not json"))),
                engine.submit([1, 2], SamplingParams(grammar=("regex", "[a-"))),
                engine.submit([1, 2], SamplingParams(grammar=("json_schema", '{"type": "object", "properties": 3}')))])
            gen = engine.submit([1, 2, 3], SamplingParams(grammar=("json_schema", json.dumps({**SCHEMA, "title": "x"}))))
            await gen.cancel()
            (cancelled,) = await all_answers([gen])
            while engine.live_requests:
                await trio.sleep(0.01)
            assert engine.statistics().kv.used_blocks == 0
    for _text, ids, reason, error in bad:
        assert reason == "error" and error.code == "invalid_request" and ids == [], (reason, error)
    assert "json_schema" in bad[0][3].message and "regex" in bad[1][3].message
    assert cancelled[2] == "cancelled"


def test_grammar_fields_are_checked():
    with pytest.raises(RequestError, match="grammar must be"):
        SamplingParams(grammar=("yaml", "x"))
    with pytest.raises(RequestError, match="at most"):
        SamplingParams(grammar=("regex", "a" * 70_000))


async def test_a_front_end_process_sends_the_grammar_to_the_core():
    from tests.test_core_ipc import core_and_client

    async with core_and_client() as (engine, client, _, _):
        (got,) = await all_answers([client.submit([4, 5, 6], SamplingParams(
            max_tokens=200, temperature=0.8, seed=1, grammar=("json_schema", json.dumps(SCHEMA))))])
    check_schema(json.loads(got[0]))
    assert got[2] == "stop"
