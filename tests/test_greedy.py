"""Exact greedy outputs: many concurrent requests through the engine equal Hugging Face `generate`
run one prompt at a time on the same weights, with chunked prefill and with preemption."""

from __future__ import annotations

import random

import pytest
import trio

from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.types import SamplingParams
from tests.conftest import hf_greedy, hf_model, read_streams

TEXTS = [
    "Hi",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why each one is prime.",
    "Translate to French: The cat sleeps on the warm windowsill while the rain falls outside.",
    "Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker who",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Summarise: Continuous batching lets a server add new requests to a running batch at every "
    "decoding step instead of waiting for the whole batch to finish, which keeps the accelerator "
    "busy and cuts the time a new request waits before its first token.",
    "2 + 2 =",
]
NEW_TOKENS = 20
_reference: dict[str, tuple] = {}


def prompts_for(name: str, tokenizer) -> list[list[int]]:
    if name == "smollm2":
        return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) for t in TEXTS]
    rng = random.Random(3)
    return [[rng.randrange(320) for _ in range(n)] for n in (1, 5, 16, 17, 33, 48, 64, 90, 120)]


def reference(name: str):
    """(prompts, HF greedy outputs), computed once per model."""
    if name not in _reference:
        from gpu.models import load_model

        loaded = load_model(name, "cpu", __import__("torch").float32)
        prompts = prompts_for(name, loaded.tokenizer)
        outs = hf_greedy(hf_model(name), prompts, NEW_TOKENS, loaded.eos_token_ids)
        _reference[name] = (prompts, outs)
    return _reference[name]


async def run_all(engine, prompts) -> list[list[int]]:
    """Submit every prompt before the step loop runs once (so each run batches them the same
    way, whatever the machine's load), then read all streams concurrently."""
    gens = [engine.submit(ids, SamplingParams(max_tokens=NEW_TOKENS)) for ids in prompts]
    return await read_streams(gens)


@pytest.mark.parametrize("name", ["smollm2", "random:tiny-qwen3"])
@pytest.mark.parametrize("mode", ["chunked_prefill", "preemption"])
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
async def test_greedy_matches_hugging_face(name, mode, overlap):
    prompts, expected = await trio.to_thread.run_sync(reference, name)
    if mode == "chunked_prefill":
        config = EngineConfig(model=name, max_batch_tokens=24, kv_memory=0.02, overlap=overlap)
    else:
        longest = max(len(p) for p in prompts) + NEW_TOKENS
        config = EngineConfig(model=name, max_batch_tokens=256, kv_blocks=longest // 16 + 3, overlap=overlap)
    with trio.fail_after(600):
        async with open_engine(config) as engine:
            got = await run_all(engine, prompts)
            stats = engine.statistics()
            assert stats.kv.free_blocks == stats.kv.total_blocks
            if mode == "preemption":
                assert stats.preemptions > 0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"prompt {i} ({len(prompts[i])} tokens): engine {g} != HF {e}"
