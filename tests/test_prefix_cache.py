"""Prefix caching: full KV blocks are found again by a hash of their whole prefix; outputs are
exactly those of an uncached run; cached blocks count as free and are evicted LRU."""

from __future__ import annotations

import trio

from streamer.allocator import BlockAllocator
from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.scheduler import Scheduler, Sequence
from streamer.types import SamplingParams, TokenEvent


def test_allocator_keeps_freed_cached_blocks_until_evicted_lru():
    a = BlockAllocator(4)
    b0, b1 = a.allocate(2)
    a.register(b0, 100)
    a.register(b1, 101)
    a.free([b0, b1])
    assert a.statistics().free_blocks == 4 and a.statistics().cached_blocks == 2
    assert a.lookup([100, 101, 102]) == [b0, b1]  # both revived, with a reference each
    assert a.statistics().used_blocks == 2
    a.free([b1, b0])  # b1 is now the least recently used
    fresh = a.allocate(3)  # 2 never-used blocks, then evicts b1
    assert b1 in fresh and b0 not in fresh
    assert a.lookup([100]) == [b0] and a.lookup([101]) == []


def test_scheduler_reuses_whole_blocks_and_always_computes_the_last_token():
    alloc = BlockAllocator(32)
    s = Scheduler(alloc, 4, 64, 8, prefix_caching=True)
    first = Sequence("a", list(range(1, 11)), 1)  # 10 tokens: blocks [1-4] [5-8] and 2 more; done after 1
    s.add(first)
    plan = s.schedule()
    s.update(plan, [99])
    second = Sequence("b", list(range(1, 9)) + [42, 43], 1)  # same first 8 tokens
    s.add(second)
    plan = s.schedule()
    (chunk,) = plan.chunks
    assert chunk.start == 8 and chunk.length == 2  # 2 blocks reused
    third = Sequence("c", list(range(1, 9)), 1)  # exactly 2 blocks: the last one is recomputed
    s.add(third)
    s.update(plan, [7])
    plan = s.schedule()
    (chunk,) = plan.chunks
    assert chunk.start == 4 and chunk.length == 4
    assert s.prefix_hit_tokens == 8 + 4


async def chat(engine, messages, n=12):
    ids = engine.encode_chat(messages)
    out = []
    async with engine.submit(ids, SamplingParams(max_tokens=n)) as gen:
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                out.append(ev.token_id)
    return out


async def test_multi_turn_chat_hits_the_cache_and_answers_exactly_as_without_it():
    conversation = [{"role": "user", "content": "Name a large animal that lives in the sea."}]
    results = {}
    for cached in (False, True):
        config = EngineConfig(model="smollm2", kv_blocks=256, prefix_caching=cached)
        async with open_engine(config) as engine:
            with trio.fail_after(120):
                turn1 = await chat(engine, conversation)
                answer = engine.tokenizer.decode(turn1, skip_special_tokens=True)
                turn2 = await chat(engine, conversation + [{"role": "assistant", "content": answer},
                                                           {"role": "user", "content": "How big does it get?"}])
            stats = engine.statistics()
            assert stats.kv.free_blocks == stats.kv.total_blocks
            results[cached] = (turn1, turn2, stats.prefix_hit_tokens)
    assert results[True][:2] == results[False][:2]
    assert results[False][2] == 0
    assert results[True][2] >= 32  # turn 2 re-sends turn 1: its full blocks come from the cache


def test_prefix_caching_is_a_command_line_switch():
    from streamer.__main__ import build_parser, config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["serve"])).prefix_caching is True
    assert config_from_args(parse(["serve", "--no-prefix-caching"])).prefix_caching is False
