"""The engine core's socket and a front end's EngineClient, in one test process: what a request
sees through the client must be what it sees from the engine itself, and nothing leaks when a
front end misbehaves or the core goes away."""

from __future__ import annotations

import os
import tempfile
from contextlib import asynccontextmanager

import pytest
import structlog
import trio

from streamer import ipc
from streamer.client import EngineClient
from streamer.config import EngineConfig
from streamer.core import Link, serve_core
from streamer.engine import open_engine
from streamer.types import FinishEvent, RequestError, SamplingParams, TokenEvent

TIMEOUT = 60
CONFIG = EngineConfig(model="random:tiny-qwen3", kv_memory=0.05, max_batch_tokens=256, max_running=8, max_waiting=64)


@asynccontextmanager
async def core_and_client(config: EngineConfig = CONFIG):
    """(engine, client, socket path, the core's cancel scope) with the core serving one client."""
    path = os.path.join(tempfile.mkdtemp(prefix="streamer-test-"), "core.sock")
    with trio.fail_after(TIMEOUT):
        async with open_engine(config) as engine, trio.open_nursery() as nursery:
            core_scope = trio.CancelScope()

            async def core(task_status=trio.TASK_STATUS_IGNORED):
                with core_scope:
                    await serve_core(engine, path, task_status=task_status)

            await nursery.start(core)
            client = EngineClient(path, engine.tokenizer, frontend=1)
            await nursery.start(client.run)
            yield engine, client, path, core_scope
            nursery.cancel_scope.cancel()


async def read(gen) -> tuple[list[int], str, FinishEvent]:
    ids, text = [], ""
    async with gen:
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                assert ev.index == len(ids)
                ids.append(ev.token_id)
                text += ev.text
            else:
                return ids, text, ev
    raise AssertionError("no finish event")


async def read_all(gens) -> list:
    out = [None] * len(gens)

    async def one(i, gen):
        out[i] = await read(gen)

    async with trio.open_nursery() as nursery:
        for i, gen in enumerate(gens):
            nursery.start_soon(one, i, gen)
    return out


async def wait_kv_free(engine) -> None:
    while engine.allocator.statistics().used_blocks or engine.live_requests:
        await trio.sleep(0.01)


PROMPTS = ["Once upon a time", "The capital of France", "a", "1 2 3 4 5 6 7 8 9", "hello hello hello"]


async def test_the_client_streams_what_the_engine_does():
    """Greedy and seeded tokens and texts, batched together, are the same through the socket."""
    async with core_and_client() as (engine, client, _, _):
        params = [SamplingParams(max_tokens=24, ignore_eos=True),
                  SamplingParams(max_tokens=17, temperature=0.8, seed=5, ignore_eos=True)]
        direct = await read_all([engine.submit(engine.encode_prompt(p), sp) for p in PROMPTS for sp in params])
        remote = await read_all([client.submit(client.encode_prompt(p), sp) for p in PROMPTS for sp in params])
        for (ids_a, text_a, done_a), (ids_b, text_b, done_b) in zip(direct, remote, strict=True):
            assert ids_a == ids_b and text_a == text_b
            assert (done_b.finish_reason, done_b.prompt_tokens, done_b.completion_tokens) == \
                   (done_a.finish_reason, done_a.prompt_tokens, done_a.completion_tokens) == ("length", done_a.prompt_tokens, len(ids_a))
            assert done_b.timing.ttft_ms is not None and done_b.timing.queue_ms is not None
        await wait_kv_free(engine)
        assert client.live_requests == 0


async def test_a_stop_string_ends_the_stream_in_the_front_end():
    """Stop strings are the front end's: the text and usage equal the in-process engine's, and the
    core is told to stop (its KV freed)."""
    async with core_and_client() as (engine, client, _, _):
        prompt = engine.encode_prompt("Once upon a time")
        _, full, _ = await read(engine.submit(prompt, SamplingParams(max_tokens=40, ignore_eos=True)))
        stop = full[len(full) // 2:len(full) // 2 + 2]
        assert stop.strip(), full
        params = SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,))
        ids_a, text_a, done_a = await read(engine.submit(prompt, params))
        ids_b, text_b, done_b = await read(client.submit(prompt, params))
        assert done_a.finish_reason == done_b.finish_reason == "stop"
        assert (ids_a, text_a, done_a.completion_tokens) == (ids_b, text_b, done_b.completion_tokens)
        assert stop not in text_b and len(ids_b) < 40
        await wait_kv_free(engine)


async def test_a_front_end_that_falls_behind_streams_the_same(monkeypatch):
    """When the core's writer to a front end lags, one frame carries several steps, so the same
    request several times: its tokens, texts (a stop string too) and finishes are still the
    engine's."""
    wait = Link.wait

    async def lagging(self):
        await wait(self)
        await trio.sleep(0.1)  # steps pile up meanwhile

    async with core_and_client() as (engine, client, _, _):
        prompt = engine.encode_prompt("Once upon a time")
        _, full, _ = await read(engine.submit(prompt, SamplingParams(max_tokens=40, ignore_eos=True)))
        stop = full[len(full) // 2:len(full) // 2 + 2]
        params = [SamplingParams(max_tokens=24, ignore_eos=True), SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,))]
        direct = await read_all([engine.submit(engine.encode_prompt(p), sp) for p in [*PROMPTS, "Once upon a time"] for sp in params])
        monkeypatch.setattr(Link, "wait", lagging)
        steps = []
        on_step = client._on_step
        monkeypatch.setattr(client, "_on_step", lambda step: (steps.append(len(step.rids) - len(set(step.rids))), on_step(step)))
        remote = await read_all([client.submit(client.encode_prompt(p), sp) for p in [*PROMPTS, "Once upon a time"] for sp in params])
        assert max(steps) > 0  # some frame did hold a request more than once
        for (ids_a, text_a, done_a), (ids_b, text_b, done_b) in zip(direct, remote, strict=True):
            assert (ids_a, text_a, done_a.finish_reason, done_a.completion_tokens) == \
                   (ids_b, text_b, done_b.finish_reason, done_b.completion_tokens)
        await wait_kv_free(engine)
        assert client.live_requests == 0


async def test_cancel_and_a_reader_that_left_free_the_kv():
    async with core_and_client() as (engine, client, _, _):
        long = SamplingParams(max_tokens=2000, ignore_eos=True)
        gen = client.submit(client.encode_prompt("x"), long)
        async with gen:
            async for ev in gen:
                if isinstance(ev, TokenEvent) and ev.index == 3:
                    await gen.cancel()
                if isinstance(ev, FinishEvent):
                    assert ev.finish_reason == "cancelled"
        gen = client.submit(client.encode_prompt("y"), long)
        async with gen:
            async for ev in gen:
                if isinstance(ev, TokenEvent) and ev.index == 3:
                    break  # leaving the block: the reader is gone
        await wait_kv_free(engine)
        while client.live_requests:
            await trio.sleep(0.01)


async def test_a_malformed_frame_aborts_that_front_ends_requests_only(caplog):
    """A front end that sends garbage loses its connection and its requests (KV freed); another
    front end's stream goes on, and the core takes new connections."""
    async with core_and_client() as (engine, client, path, _):
        good = client.submit(client.encode_prompt("good"), SamplingParams(max_tokens=60, ignore_eos=True))
        async with trio.open_nursery() as nursery:
            result = {}

            async def read_good():
                result["good"] = await read(good)

            nursery.start_soon(read_good)
            bad = await trio.open_unix_socket(path)
            reader = ipc.FrameReader(bad, ipc.to_frontend)
            assert isinstance((await reader.receive())[0], ipc.Welcome)
            await bad.send_all(ipc.encode([ipc.Hello(9, 1), ipc.Submit(1, [1, 2, 3], 1000, 0.0, 0, 1.0, None, True, 0,
                                                                          "bad", "bad/1")]))
            while engine.live_requests < 2:  # both requests are in the engine
                await trio.sleep(0.01)
            await bad.send_all(b"\x05\x00\x00\x00garbage")
            while engine.live_requests > 1:
                await trio.sleep(0.01)
        ids, _, done = result["good"]
        assert done.finish_reason == "length" and len(ids) == 60
        await wait_kv_free(engine)
        again = await trio.open_unix_socket(path)  # the core still takes front ends
        assert isinstance((await ipc.FrameReader(again, ipc.to_frontend).receive())[0], ipc.Welcome)
        await again.aclose()


async def test_frames_that_are_not_the_protocol_are_refused():
    with pytest.raises(ipc.MalformedFrame):
        await ipc.FrameReader(_OneShot(b"\xff\xff\xff\x7f"), ipc.to_core).receive()
    with pytest.raises(ipc.MalformedFrame):  # valid msgpack, not a message
        await ipc.FrameReader(_OneShot(ipc.encode([{"type": "submit"}])), ipc.to_core).receive()
    frame = ipc.encode([ipc.Cancel(3)])
    assert await ipc.FrameReader(_OneShot(frame), ipc.to_core).receive() == [ipc.Cancel(3)]


class _OneShot(trio.abc.ReceiveStream):
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def receive_some(self, max_bytes=None) -> bytes:
        data, self.data = self.data, b""
        return data

    async def aclose(self) -> None:
        pass


async def test_when_the_core_goes_its_live_requests_end_unavailable():
    async with core_and_client() as (engine, client, _, core_scope):
        gen = client.submit(client.encode_prompt("x"), SamplingParams(max_tokens=5000, ignore_eos=True))
        async with gen:
            async for ev in gen:
                if isinstance(ev, TokenEvent) and ev.index == 2:
                    core_scope.cancel()  # the core's socket and every connection close
                if isinstance(ev, FinishEvent):
                    assert ev.finish_reason == "error" and ev.error.code == "unavailable"
        with pytest.raises(RequestError) as err:
            client.submit(client.encode_prompt("x"), SamplingParams())
        assert err.value.code == "unavailable"
        with pytest.raises(RequestError):
            await client.health()
        await wait_kv_free(engine)  # the core cancelled what its front end can no longer read


async def test_a_core_that_closes_while_its_front_end_drains_is_not_an_error():
    """A Ctrl-C reaches the core and the front end at once: the core, with nothing live, closes
    while the front end drains. That is a clean stop (an info line), where a core that closes on a
    front end still serving is `core_connection_lost`, an error."""
    for draining in (True, False):
        with structlog.testing.capture_logs() as logs:
            async with core_and_client() as (_, client, _, core_scope):
                if draining:
                    client.stop_accepting()
                core_scope.cancel()
                while not any(e["event"] in ("core_closed", "core_connection_lost") for e in logs):
                    await trio.sleep(0.01)
        ends = [(e["event"], e["log_level"]) for e in logs if e["event"] in ("core_closed", "core_connection_lost")]
        assert ends == ([("core_closed", "info")] if draining else [("core_connection_lost", "error")])


async def test_the_cores_figures_count_what_every_door_reports():
    async with core_and_client() as (engine, client, _, _):
        await read(client.submit(client.encode_prompt("x"), SamplingParams(max_tokens=4)))
        client.count_error("invalid_json")
        client.delivered([0.004, 0.005])
        while engine.metrics.total["itl_sent"].get_total_count() < 2:
            await trio.sleep(0.02)
        text = (await client.metrics_text()).decode()
        assert 'streamer_errors_total{code="invalid_json"} 1.0' in text
        assert 'streamer_requests_total{finish_reason="length"} 1.0' in text
        stats = await client.stats()
        assert stats["requests_finished"] == 1 and stats["answered_by"]["frontend"] == 1
        assert [f["frontend"] for f in stats["processes"]["frontends"]] == [1]
        assert stats["kv"]["used_blocks"] == 0
        health = await client.health()
        assert health["kv"]["free_blocks"] == health["kv"]["total_blocks"]


async def test_refusals_by_the_core_arrive_as_error_finishes():
    """What only the core can judge (here: a token id outside the vocabulary, through the socket
    as a raw Submit would send it) comes back as an error finish for that request alone."""
    async with core_and_client() as (engine, client, path, _):
        sock = await trio.open_unix_socket(path)
        reader = ipc.FrameReader(sock, ipc.to_frontend)
        await reader.receive()
        await sock.send_all(ipc.encode([ipc.Submit(1, [10**6], 4, 0.0, 0, 1.0, None, False, 0, "c", "x")]))
        (step,) = await reader.receive()
        assert step.finished[0].rid == 1 and step.finished[0].error_code == "invalid_request"
        await sock.aclose()
        ids, _, done = await read(client.submit(client.encode_prompt("still fine"), SamplingParams(max_tokens=3)))
        assert done.finish_reason == "length"



async def test_a_front_end_that_reuses_a_live_request_number_is_cut_off():
    async with core_and_client() as (engine, client, path, _):
        sock = await trio.open_unix_socket(path)
        reader = ipc.FrameReader(sock, ipc.to_frontend)
        await reader.receive()
        submit = ipc.Submit(1, [1, 2, 3], 1000, 0.0, 0, 1.0, None, True, 0, "c", "x")
        await sock.send_all(ipc.encode([submit]))
        while engine.live_requests < 1:
            await trio.sleep(0.01)
        await sock.send_all(ipc.encode([submit]))
        with trio.fail_after(10):
            while await sock.receive_some(1 << 16):  # the core hangs up
                pass
        await wait_kv_free(engine)
        ids, _, done = await read(client.submit(client.encode_prompt("still fine"), SamplingParams(max_tokens=3)))
        assert done.finish_reason == "length"
