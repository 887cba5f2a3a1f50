"""The engine through its public API on the tiny random model: streaming, cancel, disconnect,
errors at the edge, sampling, stop strings, and a failing step. KV blocks always come back."""

from __future__ import annotations

import pytest
import trio

from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.types import FinishEvent, RequestError, SamplingParams, TokenEvent

TINY = "random:tiny-qwen3"


async def collect(gen) -> tuple[list[TokenEvent], FinishEvent]:
    tokens, finish = [], None
    async with gen:
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                tokens.append(ev)
            else:
                finish = ev
    return tokens, finish


async def wait_kv_free(engine):
    with trio.fail_after(10):
        while (kv := engine.kv_statistics()).free_blocks != kv.total_blocks:
            await trio.sleep(0.01)


@pytest.fixture(params=["serial", "overlap", "inline"])
async def engine(request):
    """The step loops: serial (the CPU's default), overlapped (step N+1 is planned and launched
    before step N's ids are back), and overlapped with the launch on the loop's own thread and a
    polled wait (CUDA's)."""
    config = EngineConfig(model=TINY, kv_blocks=64, max_batch_tokens=64, overlap=request.param != "serial",
                          launch="inline" if request.param == "inline" else "thread")
    async with open_engine(config) as eng:
        yield eng


async def test_stream_indices_usage_and_timing(engine):
    with trio.fail_after(30):
        tokens, done = await collect(engine.generate("hello", SamplingParams(max_tokens=12, ignore_eos=True)))
    assert [t.index for t in tokens] == list(range(12))
    assert done.finish_reason == "length" and done.completion_tokens == 12 and done.prompt_tokens == 5
    assert 0 <= done.timing.queue_ms <= done.timing.ttft_ms <= done.timing.total_ms
    await wait_kv_free(engine)


async def test_cancel_mid_stream_frees_blocks(engine):
    with trio.fail_after(30):
        gen = engine.generate("cancel me", SamplingParams(max_tokens=1000, ignore_eos=True))
        seen = 0
        async with gen:
            async for ev in gen:
                if isinstance(ev, TokenEvent):
                    seen += 1
                    if seen == 3:
                        await gen.cancel()
                else:
                    assert ev.finish_reason == "cancelled" and ev.completion_tokens >= 3
        assert engine.kv_statistics().used_blocks == 0


async def test_reader_leaving_aborts_request_and_frees_blocks(engine):
    with trio.fail_after(30):
        gen = engine.generate("bye", SamplingParams(max_tokens=1000, ignore_eos=True))
        async with gen:
            async for _ in gen:
                break  # the client disconnects: leaving `async with` closes the stream
        await wait_kv_free(engine)
        assert engine.statistics().running == 0


async def test_prompt_too_long_and_bad_ids_are_refused(engine):
    capacity = min(engine.max_context, 64 * 16)
    with pytest.raises(RequestError) as err:
        engine.submit([1] * capacity, SamplingParams())
    assert err.value.code == "prompt_too_long"
    with pytest.raises(RequestError) as err:
        engine.submit([], SamplingParams())
    assert err.value.code == "invalid_request"
    with pytest.raises(RequestError) as err:
        engine.submit([10**9], SamplingParams())
    assert err.value.code == "invalid_request"


async def test_max_tokens_is_capped_by_capacity(engine):
    capacity = min(engine.max_context, 64 * 16)
    with trio.fail_after(60):
        tokens, done = await collect(engine.submit([1] * (capacity - 3), SamplingParams(max_tokens=50, ignore_eos=True)))
    assert done.finish_reason == "length" and len(tokens) == 3


async def test_bad_sampling_params_raise_invalid_request():
    for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2),
                dict(temperature=float("nan")), dict(seed=-1), dict(stop=("",))):
        with pytest.raises(RequestError) as err:
            SamplingParams(**bad)
        assert err.value.code == "invalid_request"


async def test_overloaded_when_inbox_is_full():
    async with open_engine(EngineConfig(model=TINY, kv_blocks=64, max_waiting=2)) as eng:
        # The step loop gets no chance to drain the inbox between these synchronous submits.
        gens = [eng.submit([1, 2], SamplingParams(max_tokens=2)) for _ in range(2)]
        with pytest.raises(RequestError) as err:
            eng.submit([1, 2], SamplingParams(max_tokens=2))
        assert err.value.code == "overloaded"
        with trio.fail_after(30):
            for g in gens:
                _, done = await collect(g)
                assert done.finish_reason == "length"


async def test_seeded_sampling_is_reproducible_and_concurrency_independent(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    with trio.fail_after(60):
        alone, _ = await collect(engine.generate("seeded", params))
        results = {}

        async def run(i, p):
            results[i] = [t.token_id for t in (await collect(engine.generate("seeded", p)))[0]]

        async with trio.open_nursery() as n:
            n.start_soon(run, 0, params)
            n.start_soon(run, 1, SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True))
    assert results[0] == [t.token_id for t in alone]
    assert results[1] != results[0]


async def test_stop_string_ends_generation_and_is_not_sent(engine):
    with trio.fail_after(30):
        tokens, _ = await collect(engine.generate("x", SamplingParams(max_tokens=40, ignore_eos=True)))
        text = "".join(t.text for t in tokens)
        stop = text[5:8]
        assert len(stop) == 3
        tokens2, done = await collect(engine.generate("x", SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,))))
    assert done.finish_reason == "stop"
    assert "".join(t.text for t in tokens2) == text[: text.index(stop)]
    await wait_kv_free(engine)


async def test_request_stopped_while_next_step_runs_gets_no_token_from_it(engine, monkeypatch):
    """With overlap, tokens of step N are sent while step N+1 runs. A stop string found in step N's
    tokens ends the request after step N+1 was planned with it: that step's token for it must be dropped."""
    if not engine.overlap:
        pytest.skip("serial steps: no step is in flight while tokens are sent")
    planned_after_stop = {}
    real_update = engine.scheduler.update

    def update(plan, sampled):
        for chunk in plan.chunks:
            if chunk.seq.finish_reason == "stop":  # ended by a stop string while this step ran
                planned_after_stop[chunk.seq.request_id] = len(chunk.seq.output_ids)
        return real_update(plan, sampled)

    monkeypatch.setattr(engine.scheduler, "update", update)
    with trio.fail_after(30):
        tokens, _ = await collect(engine.generate("x", SamplingParams(max_tokens=40, ignore_eos=True)))
        text = "".join(t.text for t in tokens)
        stop = text[5:8]
        results = {}

        async def run(key, params):
            results[key] = await collect(engine.generate("x", params))

        async with trio.open_nursery() as n:  # a long neighbour keeps steps coming
            n.start_soon(run, "stopped", SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)))
            n.start_soon(run, "long", SamplingParams(max_tokens=60, ignore_eos=True))
    stopped, done = results["stopped"]
    assert done.finish_reason == "stop"
    assert planned_after_stop, "the stop string was found while the next step was in flight"
    (seen,) = planned_after_stop.values()
    assert done.completion_tokens == len(stopped) == seen  # nothing from the in-flight step
    assert [t.index for t in stopped] == list(range(len(stopped)))
    assert "".join(t.text for t in stopped) == text[: text.index(stop)]
    assert results["long"][1].completion_tokens == 60
    await wait_kv_free(engine)


async def fails_once_then_serves(engine) -> None:
    """With a fault injected into its next step: that request ends "internal", the next is served."""
    with trio.fail_after(30):
        _, done = await collect(engine.generate("boom", SamplingParams(max_tokens=4)))
        assert done.finish_reason == "error" and done.error.code == "internal"
        _, done = await collect(engine.generate("fine", SamplingParams(max_tokens=4, ignore_eos=True)))
        assert done.finish_reason == "length"
    await wait_kv_free(engine)


async def test_failing_step_fails_its_requests_and_engine_keeps_serving(engine, monkeypatch):
    real_launch = engine.runner.launch
    calls = {"n": 0}

    def flaky(inputs, *swaps):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real_launch(inputs, *swaps)

    monkeypatch.setattr(engine.runner, "launch", flaky)
    await fails_once_then_serves(engine)


async def test_a_fault_while_waiting_for_the_device_fails_that_step_and_engine_keeps_serving(engine, monkeypatch):
    """A device error may surface when the step loop looks at a launched step (inline) or waits for
    it (worker thread): that step's requests end with "internal", later requests are served."""
    real_ready, real_collect = engine.runner.ready, engine.runner.collect
    faults = {"ready": 1, "collect": 1}

    def ready(handle):
        if engine.launch_inline and faults["ready"]:
            faults["ready"] -= 1
            raise RuntimeError("injected device fault")
        return real_ready(handle)

    def collect_(handle):
        if not engine.launch_inline and faults["collect"]:
            faults["collect"] -= 1
            raise RuntimeError("injected device fault")
        return real_collect(handle)

    monkeypatch.setattr(engine.runner, "ready", ready)
    monkeypatch.setattr(engine.runner, "collect", collect_)
    await fails_once_then_serves(engine)


async def test_many_concurrent_requests_all_finish_and_share_steps(engine):
    n = 24
    finished = []

    async def one(i):
        _, done = await collect(engine.generate(f"prompt {i}", SamplingParams(max_tokens=8, ignore_eos=True)))
        finished.append(done.finish_reason)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    assert finished == ["length"] * n
    assert engine.statistics().steps < n * 8  # continuous batching: far fewer steps than tokens
    await wait_kv_free(engine)


async def test_unknown_model_is_a_clear_error():
    with pytest.raises((ValueError, FileNotFoundError), match="random:NAME|supported|unknown"):
        async with open_engine(EngineConfig(model="/nonexistent/model")):
            pass
    with pytest.raises(ValueError, match="unknown random model"):
        async with open_engine(EngineConfig(model="random:nope")):
            pass


async def test_metrics_measure_every_token_gap_and_finish(engine):
    from prometheus_client import generate_latest

    with trio.fail_after(30):
        for _ in range(3):
            await collect(engine.generate("metrics", SamplingParams(max_tokens=5, ignore_eos=True)))
    snap = engine.metrics.snapshot()
    assert snap["since_start"]["ttft"]["count"] == 3
    assert snap["since_start"]["itl"]["count"] == 3 * 4  # every gap, not a mean
    assert snap["since_start"]["e2e"]["count"] == 3 and snap["window"]["e2e"]["count"] == 3
    assert snap["since_start"]["ttft"]["p50_ms"] <= snap["since_start"]["e2e"]["p99_ms"]
    assert snap["tokens_generated"] == 15 and snap["kv_used_blocks"] == 0
    text = generate_latest(engine.metrics.registry).decode()
    assert 'streamer_requests_total{finish_reason="length"} 3.0' in text
    assert "streamer_inter_token_latency_seconds_bucket" in text
    assert "streamer_generated_tokens_total 15.0" in text


async def test_client_that_stops_reading_is_aborted_as_slow_consumer():
    async with open_engine(EngineConfig(model=TINY, kv_blocks=64, max_buffered_events=8)) as eng:
        gen = eng.generate("never read", SamplingParams(max_tokens=500, ignore_eos=True))
        async with gen:
            with trio.fail_after(30):
                while eng.metrics.finished == 0:  # the client reads nothing meanwhile
                    await trio.sleep(0.01)
            assert eng.kv_statistics().used_blocks == 0
            events = [ev async for ev in gen]
        assert all(isinstance(e, TokenEvent) for e in events[:-1]) and len(events) == 8
        assert events[-1].finish_reason == "error" and events[-1].error.code == "slow_consumer"


async def test_a_reader_that_falls_behind_later_is_aborted_once_its_outbox_is_full():
    async with open_engine(EngineConfig(model=TINY, kv_blocks=64, max_buffered_events=8)) as eng:
        gen = eng.generate("read a while", SamplingParams(max_tokens=500, ignore_eos=True))
        async with gen:
            with trio.fail_after(30):
                for i in range(20):  # more than the outbox holds, so the engine looks at it again
                    assert (await gen.__anext__()).index == i
                while eng.metrics.finished == 0:  # then the client reads nothing
                    await trio.sleep(0.01)
            events = [ev async for ev in gen]
        assert [e.index for e in events[:-1]] == list(range(20, 27))  # every slot but the last
        assert events[-1].finish_reason == "error" and events[-1].error.code == "slow_consumer"


async def test_waiting_queue_is_bounded_and_cancel_is_never_stuck_behind_it():
    async with open_engine(EngineConfig(model=TINY, kv_blocks=64, max_waiting=4, max_running=1)) as eng:
        with trio.fail_after(30):
            long = eng.generate("hog", SamplingParams(max_tokens=10_000 // 16, ignore_eos=True))
            async with long:
                await long.__anext__()  # running
                queued, refused = [], 0
                for _ in range(20):
                    try:
                        queued.append(eng.submit([1, 2], SamplingParams(max_tokens=1)))
                    except RequestError as err:
                        assert err.code == "overloaded"
                        refused += 1
                    await trio.sleep(0.01)  # let the step loop drain what it may
                assert 0 < len(queued) <= 2 * 4 and refused == 20 - len(queued)
                await long.cancel()
                assert [ev async for ev in long][-1].finish_reason == "cancelled"
            for g in queued:
                _, done = await collect(g)
                assert done.finish_reason == "length"


async def test_loop_lag_shows_a_blocked_event_loop():
    """Something that holds the event loop (here a blocking sleep, as a slow handler would) holds
    every stream's next frame; /stats shows it as `loop_lag`, sampled every 10 ms."""
    import time

    async with open_engine(EngineConfig(model=TINY, kv_blocks=64)) as engine:
        await trio.sleep(0.2)  # the watcher samples an idle loop
        time.sleep(0.25)  # noqa: ASYNC251 - blocking on purpose
        await trio.sleep(0.05)
        lag = engine.metrics.snapshot()["window"]["loop_lag"]
    assert lag["count"] >= 5, lag
    assert lag["max_ms"] >= 200, lag
    assert lag["p50_ms"] < 50, lag
