"""Overlapped steps on CUDA: the decode graphs, the device-side feed of the ids still in flight
and the double-buffered staging give exactly the tokens of serial steps.

All requests are submitted before the first step, so both runs plan the same steps and run the
same kernels on the same numbers: their greedy tokens must agree bit for bit, not just nearly."""

from __future__ import annotations

import random

import pytest
import trio

from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.types import SamplingParams
from tests.conftest import read_streams

pytestmark = pytest.mark.gpu
MODEL = "random:qwen2.5-0.5b"


async def run(config, prompts, new):
    async with open_engine(config) as engine:
        assert engine.overlap is config.overlap and engine.runner.graphs.graphs
        gens = [engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, new, strict=True)]
        with trio.fail_after(120):
            out = await read_streams(gens)
        st = engine.statistics()
        assert st.kv.free_blocks == st.kv.total_blocks and st.swap_slots_free == st.swap_slots
    return out, st


async def test_overlapped_steps_give_the_tokens_of_serial_steps():
    """Chunked prefills share steps with decodes (eager steps, fed ids), then decode-only steps
    replay graphs of several buckets (fed ids, both staging buffers). Swaps under overlap are
    checked block for block in tests/test_swap_gpu.py (overlap is CUDA's default)."""
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 32000) for _ in range(rng.randrange(10, 300))] for _ in range(60)]
    new = [rng.randrange(1, 48) for _ in prompts]
    kw = dict(model=MODEL, max_running=64, max_batch_tokens=512, kv_blocks=2048)
    serial, st_serial = await run(EngineConfig(**kw, overlap=False), prompts, new)
    overlap, st_overlap = await run(EngineConfig(**kw, overlap=True), prompts, new)
    assert [len(o) for o in overlap] == new
    assert overlap == serial
    assert st_overlap.steps == st_serial.steps
