"""Tensor parallelism on the CPU over gloo (gpu/parallel.py): two ranks, each a process holding
half the heads, half the MLP and half the vocabulary, give the greedy tokens one process gives,
through chunked prefill, shared steps and a preempted request computed again; the engine with
`tensor_parallel_size=2` streams the tokens of one process and stops its other rank."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio

from gpu.models import load_model
from gpu.parallel import TensorParallel
from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.types import SamplingParams
from tests.conftest import read_tokens
from tests.tp_script import greedy_script

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(model: str, world: int, tmp: Path) -> list[list[int]]:
    out = tmp / "tokens.json"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "tp_rank.py"), model, str(rank), str(world),
                               str(tmp / "rendezvous"), str(out)], cwd=ROOT)
             for rank in range(world)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])
def test_two_ranks_give_the_greedy_tokens_of_one(model, tmp_path):
    """tiny-llama has one KV head (both ranks hold it), tiny-qwen3 two (one each) and qk-norm."""
    torch.set_num_threads(1)
    want = greedy_script(load_model(f"random:{model}", "cpu", torch.float32).model)
    assert all(len(out) == 25 for out in want)
    assert run_ranks(model, 2, tmp_path) == want


def test_a_rank_holds_its_slices():
    spec = load_model("random:tiny-qwen3", "cpu", torch.float32).model.spec  # 4 q heads, 2 KV, I 128, V 320
    part = load_model("random:tiny-qwen3", "cpu", torch.float32, tp=TensorParallel(1, 2)).model
    assert (part.spec.num_heads, part.spec.num_kv_heads, part.spec.intermediate_size) == (2, 1, 64)
    assert part.spec.vocab_size == spec.vocab_size and part.embed.shape == (160, spec.hidden_size)
    assert part.vocab_start == 160
    assert part.layers[0]["qkv"].shape == ((2 + 2 * 1) * spec.head_dim, spec.hidden_size)
    assert part.layers[0]["o"].shape == (spec.hidden_size, 2 * spec.head_dim)
    assert part.layers[0]["down"].shape == (spec.hidden_size, 64)


def test_a_size_that_does_not_divide_the_model_is_refused_naming_the_shapes():
    spec = load_model("random:tiny-qwen3", "cpu", torch.float32).model.spec
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide this model's attention heads 4, "
                                         "intermediate size 128, vocabulary 320, KV heads 2"):
        TensorParallel(0, 3).check(spec)


async def engine_tokens(config: EngineConfig, prompts: list[list[int]]) -> tuple[list[list[int]], int, int]:
    out = [[] for _ in prompts]
    async with open_engine(config) as engine:
        workers = getattr(engine.runner, "group", None)
        params = SamplingParams(max_tokens=30, ignore_eos=True)
        gens = [engine.submit(p, params) for p in prompts]  # all queued before the loop runs: same steps
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for gen, tokens in zip(gens, out, strict=True):
                    nursery.start_soon(read_tokens, gen, tokens)
        kv = engine.kv_statistics()
        assert kv.free_blocks == kv.total_blocks
        stats = engine.statistics()
    if workers is not None:  # leaving the engine stopped its other rank
        assert [p.poll() for p in workers.workers] == [0]
    return out, stats.preemptions, stats.swaps_out


@pytest.mark.parametrize(("preemption", "kv_dtype"), [("recompute", "auto"), ("swap", "auto"), ("recompute", "int8")])
async def test_an_engine_over_two_ranks_streams_the_tokens_of_one(preemption, kv_dtype):
    """Chunked prefill (a 32-token step budget), eight requests sharing steps, and preemption (an
    arena of 16 blocks for eight requests of up to 90 tokens), recomputed or swapped out and back
    (each rank swaps its own KV heads); an int8 arena too (each rank quantizes its own heads)."""
    rng = random.Random(3)
    prompts = [[rng.randrange(320) for _ in range(rng.randrange(20, 60))] for _ in range(8)]
    config = dict(model="random:tiny-llama", kv_blocks=16, max_batch_tokens=32, max_running=8, preemption=preemption,
                  swap_space=0.01, kv_dtype=kv_dtype)
    want, preempted_one, swapped_one = await engine_tokens(EngineConfig(**config), prompts)
    got, preempted_two, swapped_two = await engine_tokens(EngineConfig(**config, tensor_parallel_size=2), prompts)
    assert preempted_one and preempted_two  # the arena really was under pressure
    assert bool(swapped_one) == bool(swapped_two) == (preemption == "swap")
    assert got == want


def test_tensor_parallel_with_overlap_is_refused():
    with pytest.raises(ValueError, match="tensor parallelism runs steps without overlap"):
        EngineConfig(model="random:tiny-llama", tensor_parallel_size=2, overlap=True)


def test_a_lost_rank_stops_the_server_with_status_1(tmp_path):
    """kill -9 of the other rank: the server (one process here) exits 1 at once instead of failing
    every step after or hanging in a collective."""
    import signal
    import time

    server = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--model", "random:tiny-llama", "--port", "0",
                               "--frontends", "0", "--kv-memory", "0.05", "--tensor-parallel-size", "2"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        workers: list[str] = []
        while not workers and time.monotonic() < deadline:
            assert server.poll() is None
            found = subprocess.run(["pgrep", "-P", str(server.pid), "-f", "gpu.parallel"], capture_output=True, text=True)
            workers = found.stdout.split()
            time.sleep(0.2)
        assert len(workers) == 1
        time.sleep(2)  # well into serving (or loading: either way the rank is gone)
        os.kill(int(workers[0]), signal.SIGKILL)
        assert server.wait(timeout=30) == 1
        assert "tensor-parallel rank 1 exited with status -9; stopping" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


async def test_a_model_that_does_not_split_fails_to_build_at_once_and_leaves_no_rank():
    """Rank 0 finds the shapes do not divide after the other ranks started: it tells them to stop
    before they build anything, and the engine's error is the shapes'."""
    with trio.fail_after(60), pytest.raises(ValueError, match="tensor parallel size 3 does not divide"):
        async with open_engine(EngineConfig(model="random:tiny-qwen3", tensor_parallel_size=3)):
            pass
    found = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "gpu.parallel"], capture_output=True, text=True)
    assert found.stdout == ""
