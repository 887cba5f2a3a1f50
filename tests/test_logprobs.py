"""Log-probabilities: what a request that asks for them gets with each token equals Hugging Face's
log-softmax of the same weights' logits at that position, in the engine and through a front end."""

from __future__ import annotations

import pytest
import torch
import trio

from gpu.sampler import SampleSpec, token_logprobs
from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.types import RequestError, SamplingParams, TokenEvent
from tests.conftest import hf_model
from tests.test_core_ipc import core_and_client

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


async def events(gen) -> list[TokenEvent]:
    out = []
    async with gen:
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                out.append(ev)
            else:
                assert ev.finish_reason in ("stop", "length"), ev
    return out


def hf_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V): the log-softmax HF gives each generated token's position, teacher-forced."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return logits.float().log_softmax(-1)


def check_against(ref: torch.Tensor, evs: list[TokenEvent], k: int, atol: float) -> None:
    for i, ev in enumerate(evs):
        lp = ev.logprobs
        assert lp is not None and len(lp.top) == k
        assert lp.logprob == pytest.approx(ref[i, ev.token_id].item(), abs=atol)
        values, ids = ref[i].topk(k)
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=atol)
        for j, (tid, _) in enumerate(lp.top):  # ids where the values are not tied within the tolerance
            near = (ref[i] - values[j]).abs() <= 2 * atol
            assert near[tid], (i, j, tid, ids[j].item())


async def test_greedy_tokens_carry_hugging_faces_logprobs_and_others_carry_none():
    config = EngineConfig(model="smollm2", max_batch_tokens=64, kv_memory=0.02)
    with trio.fail_after(300):
        async with open_engine(config) as engine:
            prompts = [engine.encode_chat([{"role": "user", "content": t}]) for t in PROMPTS]
            gens = [engine.submit(prompts[0], SamplingParams(max_tokens=8, logprobs=5)),
                    engine.submit(prompts[1], SamplingParams(max_tokens=8, logprobs=0)),
                    engine.submit(prompts[1], SamplingParams(max_tokens=8))]
            got = [None] * 3

            async def read(i):
                got[i] = await events(gens[i])

            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(read, i)
            assert engine.statistics().kv.used_blocks == 0
    model = await trio.to_thread.run_sync(hf_model, "smollm2")
    for i, k in ((0, 5), (1, 0)):
        ref = hf_logprobs(model, prompts[i], [ev.token_id for ev in got[i]])
        check_against(ref, got[i], k, atol=2e-3)
        for j, ev in enumerate(got[i]):  # greedy: the token is the most likely one
            assert ev.logprobs.logprob == pytest.approx(ref[j].max().item(), abs=2e-3)
    assert all(ev.logprobs is None for ev in got[2])
    assert [ev.token_id for ev in got[2]] == [ev.token_id for ev in got[1]]


async def test_sampled_tokens_report_the_models_logprobs_not_the_tempered_ones():
    config = EngineConfig(model="random:tiny-qwen3", max_batch_tokens=64, kv_memory=0.02)
    prompt = [5, 17, 99, 3, 250, 8]
    with trio.fail_after(120):
        async with open_engine(config) as engine:
            evs = await events(engine.submit(prompt, SamplingParams(max_tokens=6, temperature=1.7, seed=11,
                                                                    ignore_eos=True, logprobs=3)))
    model = await trio.to_thread.run_sync(hf_model, "random:tiny-qwen3")
    check_against(hf_logprobs(model, prompt, [ev.token_id for ev in evs]), evs, 3, atol=1e-3)


async def test_a_front_end_gets_the_logprobs_the_engine_computes():
    prompt = [5, 17, 99, 3]
    async with core_and_client() as (engine, client, _, _):
        direct = await events(engine.submit(prompt, SamplingParams(max_tokens=5, ignore_eos=True, logprobs=4)))
        remote = await events(client.submit(prompt, SamplingParams(max_tokens=5, ignore_eos=True, logprobs=4)))
        plain = await events(client.submit(prompt, SamplingParams(max_tokens=5, ignore_eos=True)))
    assert [(e.token_id, e.logprobs) for e in remote] == [(e.token_id, e.logprobs) for e in direct]
    assert all(len(e.logprobs.top) == 4 for e in remote)
    assert [e.logprobs for e in plain] == [None] * 5


@pytest.mark.parametrize("value", [-1, 21, 2.0, True, "3"])
def test_logprobs_out_of_range_is_refused(value):
    with pytest.raises(RequestError, match="logprobs must be an integer in \\[0, 20\\]"):
        SamplingParams(logprobs=value)


def test_token_logprobs_are_the_asking_rows_log_softmax():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 300, generator=g) * 4
    ids = torch.randint(300, (5,), generator=g)
    specs = [SampleSpec(logprobs=2), SampleSpec(), SampleSpec(logprobs=0), SampleSpec(logprobs=4), SampleSpec()]
    out, rows = token_logprobs(logits, ids, specs)
    assert rows == [0, 2, 3] and out.shape == (3, 9)
    ref = logits.log_softmax(-1)
    for r, row in zip(rows, out, strict=True):
        assert row[0].item() == pytest.approx(ref[r, ids[r]].item(), abs=1e-5)
        top = ref[r].topk(4)
        assert row[1:5].tolist() == pytest.approx(top.values.tolist(), abs=1e-5)
        assert row[5:].long().tolist() == top.indices.tolist()
