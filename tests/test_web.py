"""The web layer end to end: hypercorn on 127.0.0.1 port 0 serving the real engine (random:tiny-qwen3),
driven by a real websocket client; plus the CLI's start-up, error and Ctrl-C paths.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from netutil import ready_url
from trio_websocket import open_websocket_url

from streamer.config import EngineConfig
from streamer.engine import open_engine
from streamer.types import FinishEvent, RequestError, SamplingParams, Timing, TokenEvent
from tests.conftest import FakeGeneration
from web import wswrite
from web.server import serve
from web.ws import Connection

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30  # seconds for any one I/O test; the tiny model streams hundreds of tokens a second
CONFIG = EngineConfig(model="random:tiny-qwen3", kv_memory=0.05, max_batch_tokens=256, max_running=8, max_waiting=8)


class Server:
    def __init__(self, engine, url: str) -> None:
        self.engine = engine
        self.http = url
        self.ws = url.replace("http://", "ws://") + "/v1/stream"

    def long_tokens(self, prompt: str) -> int:
        """A max_tokens that fills the context, so a stream with ignore_eos runs long enough to interrupt."""
        return self.engine.max_context - len(self.engine.encode_prompt(prompt))

    def kv_all_free(self) -> bool:
        kv = self.engine.kv_statistics()
        return kv.free_blocks == kv.total_blocks


@pytest.fixture
async def server():
    async with open_engine(CONFIG) as engine, trio.open_nursery() as nursery:
        binds = await nursery.start(serve, engine, "127.0.0.1", 0)
        yield Server(engine, binds[0])
        nursery.cancel_scope.cancel()


async def send(ws, **frame) -> None:
    await ws.send_message(json.dumps(frame))


async def recv(ws) -> dict:
    return json.loads(await ws.get_message())


async def read_until_done(ws, rid: str) -> tuple[list[dict], dict]:
    """Frames of `rid` up to its done frame; fails on an error frame or another id's frame."""
    tokens = []
    while True:
        frame = await recv(ws)
        assert frame["id"] == rid and frame["type"] != "error", frame
        if frame["type"] == "done":
            return tokens, frame
        tokens.append(frame)


async def wait_kv_free(engine) -> None:
    while True:
        kv = engine.kv_statistics()
        if kv.free_blocks == kv.total_blocks:
            return
        await trio.sleep(0.01)


async def http_get(url: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.1 GET, so the tests need no HTTP client library."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += await stream.receive_some()
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in header_lines)}
        while len(body) < int(headers["content-length"]):
            body += await stream.receive_some()
    return int(status_line.split()[1]), headers, body


# --- streaming ---------------------------------------------------------------------------------


async def test_stream_tokens_then_done(server):
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            await send(ws, type="generate", id="a", prompt="Hello there", max_tokens=12, ignore_eos=True)
            tokens, done = await read_until_done(ws, "a")
    assert [t["index"] for t in tokens] == list(range(12))
    assert all(t["type"] == "token" and isinstance(t["token_id"], int) and isinstance(t["text"], str) for t in tokens)
    assert done["finish_reason"] == "length"
    assert done["usage"] == {
        "prompt_tokens": len(server.engine.encode_prompt("Hello there")),
        "completion_tokens": 12,
    }
    assert {"queue_ms", "ttft_ms", "total_ms"} <= done["timing"].keys()
    assert done["timing"]["total_ms"] >= done["timing"]["ttft_ms"] >= 0
    assert server.kv_all_free()


async def test_token_frames_carry_logprobs_when_asked(server):
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            await send(ws, type="generate", id="a", prompt="Hello there", max_tokens=6, ignore_eos=True, logprobs=2)
            tokens, _ = await read_until_done(ws, "a")
            await send(ws, type="generate", id="b", prompt="Hello there", max_tokens=2, ignore_eos=True)
            plain, _ = await read_until_done(ws, "b")
            await send(ws, type="generate", id="c", prompt="Hello there", max_tokens=2, logprobs=21)
            refused = await recv(ws)
    tokenizer = server.engine.tokenizer
    for t in tokens:
        top = t["top_logprobs"]
        assert len(top) == 2 and top[0]["logprob"] >= top[1]["logprob"] and t["logprob"] <= top[0]["logprob"] + 1e-6
        assert top[0]["token_id"] == t["token_id"]  # greedy: the most likely token
        assert all(e["text"] == tokenizer.decode([e["token_id"]]) for e in top)
    assert all("logprob" not in t for t in plain)
    assert refused["type"] == "error" and refused["code"] == "invalid_request" and "logprobs" in refused["message"]


async def test_two_generations_multiplexed(server):
    """A chat (messages) and a plain prompt share one socket; each id's frames arrive in order."""
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            chat = [{"role": "user", "content": "Hi!"}]
            await send(ws, type="generate", id="chat", messages=chat, max_tokens=20, ignore_eos=True)
            await send(ws, type="generate", id="plain", prompt="Once upon", max_tokens=15, ignore_eos=True)
            indices: dict[str, list[int]] = {"chat": [], "plain": []}
            done: dict[str, dict] = {}
            while len(done) < 2:
                frame = await recv(ws)
                assert frame["type"] in ("token", "done"), frame
                assert frame["id"] not in done, "a frame after done"
                if frame["type"] == "token":
                    indices[frame["id"]].append(frame["index"])
                else:
                    done[frame["id"]] = frame
    assert indices == {"chat": list(range(20)), "plain": list(range(15))}
    assert done["chat"]["usage"]["prompt_tokens"] == len(server.engine.encode_chat(chat))
    assert done["plain"]["usage"]["completion_tokens"] == 15


async def test_batch_mode_sends_arrays_of_frames_in_order(server):
    """/v1/stream?batch=1: every message is a JSON array; per id the frames are those of the plain
    mode, in order, and several streams' tokens share messages."""
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws + "?batch=1") as ws:
            for rid, n in (("a", 30), ("b", 25), ("c", 20)):
                await send(ws, type="generate", id=rid, prompt="Once upon", max_tokens=n, ignore_eos=True)
            frames: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
            sizes = []
            while sum(bool(f) and f[-1]["type"] == "done" for f in frames.values()) < 3:
                message = json.loads(await ws.get_message())
                assert isinstance(message, list) and message, message
                sizes.append(len(message))
                for frame in message:
                    frames[frame["id"]].append(frame)
            await send(ws, type="cancel", id="nobody")  # errors come batched too
            assert json.loads(await ws.get_message()) == [
                {"type": "error", "id": "nobody", "code": "unknown_id", "message": "no live generation with id 'nobody'"}]
    for rid, n in (("a", 30), ("b", 25), ("c", 20)):
        assert [f["index"] for f in frames[rid][:-1]] == list(range(n))
        assert frames[rid][-1]["type"] == "done" and frames[rid][-1]["usage"]["completion_tokens"] == n
    assert max(sizes) > 1, "streams sharing steps share messages"
    assert server.kv_all_free()


async def test_frames_ready_together_go_out_in_one_write_as_separate_messages(server, monkeypatch):
    """Under hypercorn, frames queued together (three streams sharing steps) are written at once
    by web/wswrite.py; the client still reads one plain frame a message, in order per id."""
    import web.app
    writes: list[int] = []

    def recording(asgi_send):
        send_texts = wswrite.texts_sender(asgi_send)
        assert send_texts is not None, "hypercorn's websocket stream is no longer reachable from its ASGI send"

        async def send(texts):
            writes.append(len(texts))
            await send_texts(texts)
        return send

    monkeypatch.setattr(web.app, "texts_sender", recording)
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            for rid, n in (("a", 30), ("b", 25), ("c", 20)):
                await send(ws, type="generate", id=rid, prompt="Once upon", max_tokens=n, ignore_eos=True)
            frames: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
            while sum(bool(f) and f[-1]["type"] == "done" for f in frames.values()) < 3:
                frame = await recv(ws)
                frames[frame["id"]].append(frame)
    for rid, n in (("a", 30), ("b", 25), ("c", 20)):
        assert [f["index"] for f in frames[rid][:-1]] == list(range(n))
        assert frames[rid][-1]["type"] == "done" and frames[rid][-1]["usage"]["completion_tokens"] == n
    assert writes and min(writes) > 1, writes  # a lone frame takes the plain path


async def test_cancel_mid_stream(server):
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            max_tokens = server.long_tokens("Count")
            await send(ws, type="generate", id="c", prompt="Count", max_tokens=max_tokens, ignore_eos=True)
            for _ in range(3):
                assert (await recv(ws))["type"] == "token"
            await send(ws, type="cancel", id="c")
            tokens, done = await read_until_done(ws, "c")
            assert done["finish_reason"] == "cancelled"
            assert 3 <= done["usage"]["completion_tokens"] < max_tokens
            await wait_kv_free(server.engine)
            # The id is free again once done arrived.
            await send(ws, type="generate", id="c", prompt="Again", max_tokens=2)
            _, done = await read_until_done(ws, "c")
            assert done["usage"]["completion_tokens"] <= 2


async def test_disconnect_mid_stream_frees_kv(server):
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            for rid in ("x", "y"):
                await send(ws, type="generate", id=rid, prompt="Tell me a story",
                           max_tokens=server.long_tokens("Tell me a story"), ignore_eos=True)
            for _ in range(4):
                assert (await recv(ws))["type"] == "token"
            kv = server.engine.kv_statistics()
            assert kv.used_blocks > 0
        # Leaving the block closed the socket mid-stream; the server must abort both generations.
        await wait_kv_free(server.engine)


@pytest.mark.slow
async def test_smollm2_chat_over_the_socket():
    """The embedded model answers through its chat template, as the chat page asks it to."""
    config = EngineConfig(model="smollm2", kv_memory=0.05)
    with trio.fail_after(TIMEOUT * 2):
        async with open_engine(config) as engine, trio.open_nursery() as nursery:
            server = Server(engine, (await nursery.start(serve, engine, "127.0.0.1", 0))[0])
            async with open_websocket_url(server.ws) as ws:
                chat = [{"role": "user", "content": "What is the capital of France?"}]
                await send(ws, type="generate", id="q", messages=chat, max_tokens=24)
                tokens, done = await read_until_done(ws, "q")
            nursery.cancel_scope.cancel()
    answer = "".join(t["text"] for t in tokens)
    assert "Paris" in answer and done["finish_reason"] == "stop", (answer, done)


# --- bad input ---------------------------------------------------------------------------------

GEN = {"type": "generate", "id": "bad", "prompt": "hi"}
BAD_FRAMES = [
    ("{not json", "invalid_json", None),
    (b"\x00\x01binary", "invalid_json", None),
    ("[1, 2]", "unknown_type", None),
    ('"generate"', "unknown_type", None),
    (json.dumps({"id": "bad", "prompt": "hi"}), "unknown_type", "bad"),
    (json.dumps({"type": "explode", "id": "bad"}), "unknown_type", "bad"),
    (json.dumps({"type": "generate", "prompt": "hi"}), "invalid_request", None),
    (json.dumps({"type": "generate", "id": 7, "prompt": "hi"}), "invalid_request", None),
    (json.dumps({"type": "generate", "id": "bad"}), "invalid_request", "bad"),
    (json.dumps({**GEN, "messages": [{"role": "user", "content": "hi"}]}), "invalid_request", "bad"),
    (json.dumps({**GEN, "prompt": 42}), "invalid_request", "bad"),
    (json.dumps({**GEN, "prompt": ""}), "invalid_request", "bad"),
    (json.dumps({"type": "generate", "id": "bad", "messages": "hi"}), "invalid_request", "bad"),
    (json.dumps({"type": "generate", "id": "bad", "messages": [{"role": "user"}]}), "invalid_request", "bad"),
    (json.dumps({"type": "generate", "id": "bad", "messages": [{"role": "user", "content": 1}]}),
     "invalid_request", "bad"),
    (json.dumps({**GEN, "max_tokens": "5"}), "invalid_request", "bad"),
    (json.dumps({**GEN, "max_tokens": True}), "invalid_request", "bad"),
    (json.dumps({**GEN, "max_tokens": 0}), "invalid_request", "bad"),
    (json.dumps({**GEN, "max_tokens": 2.5}), "invalid_request", "bad"),
    (json.dumps({**GEN, "temperature": -1}), "invalid_request", "bad"),
    (json.dumps({**GEN, "temperature": "hot"}), "invalid_request", "bad"),
    (json.dumps({**GEN, "top_p": 0}), "invalid_request", "bad"),
    (json.dumps({**GEN, "top_k": -3}), "invalid_request", "bad"),
    (json.dumps({**GEN, "seed": -1}), "invalid_request", "bad"),
    (json.dumps({**GEN, "stop": "\n"}), "invalid_request", "bad"),
    (json.dumps({**GEN, "stop": [1]}), "invalid_request", "bad"),
    (json.dumps({**GEN, "ignore_eos": "yes"}), "invalid_request", "bad"),
    (json.dumps({**GEN, "max_token": 5}), "invalid_request", "bad"),
    (json.dumps({"type": "cancel", "id": "nobody"}), "unknown_id", "nobody"),
    (json.dumps({"type": "cancel"}), "invalid_request", None),
]


async def still_works(ws, rid: str = "ok") -> None:
    await send(ws, type="generate", id=rid, prompt="ping", max_tokens=1)
    tokens, done = await read_until_done(ws, rid)
    assert done["usage"]["completion_tokens"] == len(tokens) <= 1


async def test_bad_input_answers_error_and_keeps_connection(server):
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            for raw, code, rid in BAD_FRAMES:
                await ws.send_message(raw)
                frame = await recv(ws)
                assert (frame["type"], frame["code"], frame["id"]) == ("error", code, rid), (raw, frame)
                assert frame["message"] and "Traceback" not in frame["message"]
                await still_works(ws)


async def test_duplicate_id_and_prompt_too_long(server):
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            await send(ws, type="generate", id="d", prompt="Go", max_tokens=server.long_tokens("Go"), ignore_eos=True)
            assert (await recv(ws))["type"] == "token"
            await send(ws, type="generate", id="d", prompt="Go again")
            while (frame := await recv(ws))["type"] == "token":
                pass
            assert (frame["type"], frame["code"], frame["id"]) == ("error", "duplicate_id", "d")
            await send(ws, type="cancel", id="d")
            _, done = await read_until_done(ws, "d")
            assert done["finish_reason"] == "cancelled"

            words = "hello " * (server.engine.max_context + 8)
            assert len(server.engine.encode_prompt(words)) > server.engine.max_context
            await send(ws, type="generate", id="long", prompt=words)
            frame = await recv(ws)
            assert (frame["type"], frame["code"], frame["id"]) == ("error", "prompt_too_long", "long")
            await still_works(ws)


async def test_overloaded_is_an_error_frame(server):
    """More live requests than max_running + max_waiting: the surplus is refused, the socket lives on."""
    n = CONFIG.max_running + CONFIG.max_waiting + 8
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            for i in range(n):
                await send(ws, type="generate", id=f"g{i}", prompt="Hi", max_tokens=server.long_tokens("Hi"),
                           ignore_eos=True)
            errors: dict[str, dict] = {}
            while len(errors) < 1:
                frame = await recv(ws)
                if frame["type"] == "error":
                    errors[frame["id"]] = frame
            assert {f["code"] for f in errors.values()} == {"overloaded"}
            for i in range(n):
                await send(ws, type="cancel", id=f"g{i}")
        await wait_kv_free(server.engine)


class BrokenGeneration(FakeGeneration):
    """One token, then the engine fails: by raising ("raise") or with an error FinishEvent ("finish")."""

    def __init__(self, how: str) -> None:
        self.how = how

    async def _events(self):
        yield TokenEvent(0, 7, "a")
        if self.how == "raise":
            raise RuntimeError("engine bug")
        yield FinishEvent("error", 3, 1, Timing(0.1, 1.0, 2.0, 0.0), RequestError("internal", "model step failed"))


class BrokenEngine:
    def encode_prompt(self, text: str) -> list[int]:
        return [1, 2, 3]

    def submit(self, ids, params, request_id, **scheduling):
        return BrokenGeneration(request_id.rsplit("/", 1)[1])

    def delivered(self, gaps):  # sent-frame gaps the connection reports
        pass

    def count_error(self, code):
        pass


async def test_engine_failure_is_internal_error_then_done():
    """No real engine fails on demand, so a fake one drives the connection directly."""
    to_server, from_client = trio.open_memory_channel(8)
    frames: list[dict] = []

    async def send_text(text: str) -> None:
        frames.append(json.loads(text))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(BrokenEngine(), send_text).run, from_client.receive)
            for how in ("raise", "finish"):
                await to_server.send(json.dumps({"type": "generate", "id": how, "prompt": "x"}))
            while sum(f["type"] == "done" for f in frames) < 2:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    for how in ("raise", "finish"):
        mine = [f for f in frames if f["id"] == how]
        assert [f["type"] for f in mine] == ["token", "error", "done"], mine
        assert mine[1]["code"] == "internal" and "engine bug" not in mine[1]["message"]
        assert mine[2]["finish_reason"] == "error" and mine[2]["usage"]["completion_tokens"] == 1


# --- HTTP --------------------------------------------------------------------------------------


async def test_stats_show_a_websocket_streams_itl_as_sent():
    """A socket whose writes take 0.2 s: the step loop queues the tokens ms apart, the client gets
    them 0.2 s apart. /stats shows both: `itl` as queued, `itl_sent` as the socket's writer sent."""
    async with open_engine(CONFIG) as engine:
        to_server, from_client = trio.open_memory_channel(8)
        frames: list[dict] = []

        async def slow_send(text: str) -> None:
            await trio.sleep(0.2)
            frames.append(json.loads(text))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(Connection(engine, slow_send).run, from_client.receive)
                await to_server.send(json.dumps({"type": "generate", "id": "a", "prompt": "x", "max_tokens": 4,
                                                 "ignore_eos": True}))
                while not any(f["type"] == "done" for f in frames):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            gen = engine.generate("y", SamplingParams(max_tokens=2, ignore_eos=True))  # a step takes the reports
            async with gen:
                assert [ev async for ev in gen][-1].finish_reason == "length"
        stats = engine.metrics.snapshot()
    assert [f["index"] for f in frames if f["type"] == "token"] == [0, 1, 2, 3]
    for span in ("window", "since_start"):
        sent, queued = stats[span]["itl_sent"], stats[span]["itl"]
        assert sent["count"] == 3 and sent["p50_ms"] >= 190, sent  # "a" only: "y" had no socket
        assert queued["count"] == 4 and queued["p50_ms"] < 190, queued  # 3 gaps of "a", 1 of "y"


async def test_healthz(server):
    with trio.fail_after(TIMEOUT):
        status, headers, body = await http_get(server.http, "/healthz")
    assert status == 200 and headers["content-type"].startswith("application/json")
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["model"] == server.engine.model_name
    kv = health["kv"]
    assert kv["free_blocks"] == kv["total_blocks"] > 0 and kv["used_blocks"] == 0


async def test_chat_page(server):
    with trio.fail_after(TIMEOUT):
        status, headers, body = await http_get(server.http, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        page = body.decode()
        assert "<title>Streamer" in page and 'src="/static/app.js"' in page
        status, _, script = await http_get(server.http, "/static/app.js")
    assert status == 200 and b"/v1/stream" in script and b'"cancel"' in script


# --- CLI ---------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT)


@pytest.mark.parametrize("args", [
    ("serve", "--block-size", "7"),
    ("serve", "--port", "70000"),
    ("serve", "--dtype", "float64"),
    ("serve", "--model", "/nonexistent/model-folder", "--port", "0"),
    ("serve", "--model", "no-such-model", "--port", "0"),
])
def test_cli_refuses_bad_configuration_in_one_line(args):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error:" in result.stderr.strip().splitlines()[-1]


def test_cli_refuses_a_busy_port_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_cli("serve", "--model", "random:tiny-qwen3", "--kv-memory", "0.05", "--frontends", "0",
                         "--port", str(busy.getsockname()[1]))
    assert result.returncode == 2 and "in use" in result.stderr.strip().splitlines()[-1], result.stderr
    assert "engine_ready" not in result.stdout + result.stderr  # refused before the model loaded


async def test_cli_serves_then_exits_cleanly_on_ctrl_c():
    command = [sys.executable, "-m", "streamer", "serve", "--model", "random:tiny-qwen3", "--port", "0",
               "--kv-memory", "0.05"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with trio.fail_after(TIMEOUT * 2):
        proc = await trio.lowlevel.open_process(command, cwd=ROOT, env=env, stdout=subprocess.PIPE)
        try:
            url = await ready_url(proc)  # stdout is a pipe: the ready line is one JSON log line
            status, _, body = await http_get(url.rstrip("/"), "/healthz")
            assert status == 200 and json.loads(body)["model"]
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_a_grammar_constrains_the_answer_and_bad_ones_are_refused(server):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    with trio.fail_after(TIMEOUT):
        async with open_websocket_url(server.ws) as ws:
            await send(ws, type="generate", id="r", prompt="Code:", max_tokens=40, grammar={"type": "regex", "pattern": "[A-Z]{2}-[0-9]{3}"})
            regex, done = await read_until_done(ws, "r")
            await send(ws, type="generate", id="j", prompt="JSON:", max_tokens=60, temperature=0.5, seed=1,
                       grammar={"type": "json_schema", "schema": schema})
            js, _ = await read_until_done(ws, "j")
            await send(ws, type="generate", id="b", prompt="x", grammar={"type": "regex"})
            missing = await recv(ws)
            await send(ws, type="generate", id="c", prompt="x", grammar={"type": "json_schema", "schema": {"type": "nope"}})
            compiled = [await recv(ws), await recv(ws)]
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", "".join(t["text"] for t in regex)) and done["finish_reason"] == "stop"
    assert set(json.loads("".join(t["text"] for t in js))) == {"n"}
    assert missing["type"] == "error" and missing["code"] == "invalid_request" and "'pattern'" in missing["message"]
    assert compiled[0] == {"type": "error", "id": "c", "code": "invalid_request", "message": "invalid json_schema: Invalid type: nope"}
    assert compiled[1]["type"] == "done" and compiled[1]["finish_reason"] == "error"
    assert server.kv_all_free()
