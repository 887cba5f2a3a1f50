"""Memory pressure: a KV arena of a few dozen blocks serves 50 concurrent long requests. All
finish with exactly the greedy tokens of an unconstrained run, no request is preempted without
bound (no livelock), and the recomputed tokens are counted in /metrics and /stats. The same
holds with every scheduling policy on, under mixed priorities and clients."""

from __future__ import annotations

import random

import pytest
import trio
from prometheus_client import generate_latest

from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.types import SamplingParams
from tests.conftest import read_tokens

N, NEW = 50, 40


async def run(config, prompts, mixed=False):
    out = [[] for _ in prompts]
    preemptions = {}

    async with open_engine(config) as engine:
        original = engine.scheduler._preempt

        def counting(seq):
            preemptions[seq.request_id] = preemptions.get(seq.request_id, 0) + 1
            original(seq)

        engine.scheduler._preempt = counting
        # All submitted before the step loop runs: the same batches on every run, whatever the load.
        params = SamplingParams(max_tokens=NEW, ignore_eos=True)
        gens = [engine.submit(p, params, priority=i % 3 if mixed else 0, client=f"c{i % 4}" if mixed else "")
                for i, p in enumerate(prompts)]
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for i, gen in enumerate(gens):
                    nursery.start_soon(read_tokens, gen, out[i])
        kv = engine.kv_statistics()
        assert kv.free_blocks == kv.total_blocks
        recomputed = engine.statistics().recomputed_tokens
        assert engine.snapshot()["recomputed_tokens"] == recomputed
        assert f"streamer_recomputed_tokens_total {float(recomputed)}" in generate_latest(engine.metrics.registry).decode()
    return out, preemptions, recomputed


@pytest.mark.parametrize("policy", ["fcfs", "priority,first-token,length,fair"])
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
async def test_fifty_long_requests_in_a_tiny_arena_all_finish_identically(policy, overlap):
    rng = random.Random(5)
    prompts = [[rng.randrange(320) for _ in range(rng.randrange(20, 80))] for _ in range(N)]
    roomy = EngineConfig(model="random:tiny-qwen3", kv_blocks=2048, max_running=N, max_batch_tokens=4096)
    tight = EngineConfig(model="random:tiny-qwen3", kv_blocks=32, max_running=N, max_batch_tokens=256, policy=policy,
                         overlap=overlap)
    want, none, zero = await run(roomy, prompts)
    got, preempted, recomputed = await run(tight, prompts, mixed=policy != "fcfs")
    assert not none and not zero and preempted and recomputed  # the tight arena really was under pressure
    assert got == want
    print(f"\n{policy}: {sum(preempted.values())} preemptions, at most {max(preempted.values())} for one request, "
          f"{recomputed} tokens recomputed")
    assert max(preempted.values()) <= 8, f"a request was preempted {max(preempted.values())} times"
