"""`streamer serve --data-parallel-size 2`: two engine cores behind the front end's router, as a
user starts them, on the CPU: where requests land, what /stats and /metrics say, and what clients
see when one core dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import trio
from netutil import http
from test_multiprocess import ROOT, TIMEOUT, alive, get_json, server_process, until
from trio_websocket import ConnectionClosed, open_websocket_url

from streamer.__main__ import core_environments

DP = ("--data-parallel-size", "2", "--frontends", "1")


async def generate(ws_url: str, prompt: str, max_tokens: int, record: dict | None = None, rid: str = "r") -> list:
    """One user on a websocket of its own: a generation's frames, up to its `done`."""
    frames = [] if record is None else record.setdefault(rid, [])
    try:
        async with open_websocket_url(ws_url) as ws:
            await ws.send_message(json.dumps({"type": "generate", "id": rid, "prompt": prompt,
                                              "max_tokens": max_tokens, "ignore_eos": True}))
            while True:
                frame = json.loads(await ws.get_message())
                frames.append(frame)
                if frame["type"] == "done":
                    return frames
    except ConnectionClosed as exc:
        frames.append({"type": "closed", "code": exc.reason.code})
    return frames


async def cores(url: str) -> list[dict]:
    return (await get_json(url, "/stats"))[1]["cores"]


def finished(rows: list[dict]) -> list[int]:
    return [c["requests_finished"] for c in rows]


async def test_requests_spread_over_both_cores_and_a_repeated_prefix_stays_on_one():
    with trio.fail_after(TIMEOUT):
        async with server_process(*DP) as (proc, url):
            ws_url = url.replace("http://", "ws://") + "/v1/stream"
            rows = await cores(url)
            assert [c["up"] for c in rows] == [True, True]
            pids = [c["pid"] for c in rows] + [f["pid"] for f in (await get_json(url, "/stats"))[1]["processes"]["frontends"]]
            for i in range(8):  # short prompts, no full block to match: the idle cores take turns
                frames = await generate(ws_url, f"hello {i}", 4)
                assert frames[-1]["finish_reason"] == "length"
            assert finished(await cores(url)) == [4, 4]

            shared = " ".join(f"word{i}" for i in range(150))  # many KV blocks long
            for k in range(6):
                frames = await generate(ws_url, f"{shared} question {k}", 4)
                assert frames[-1]["finish_reason"] == "length"
            after = finished(await cores(url))
            assert sorted(n - 4 for n in after) == [0, 6], after  # all six on one core

            status, stats = await get_json(url, "/stats")
            assert stats["requests_finished"] == 14 and stats["router"]["prefix"] == 5
            status, _, body = await http(url, "GET", "/metrics")
            text = body.decode()
            assert status == 200
            for core, n in enumerate(after):
                assert f'streamer_requests_total{{core="{core}",finish_reason="length"}} {float(n)}' in text
            status, health = await get_json(url, "/healthz")
            assert status == 200 and health["cores"] == {"serving": 2, "total": 2}
            assert health["kv"]["free_blocks"] == health["kv"]["total_blocks"]
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    assert not any(alive(pid) for pid in pids)  # both cores and the front end stopped


async def test_a_killed_core_ends_only_its_own_requests_and_is_started_again():
    with trio.fail_after(TIMEOUT):
        async with server_process(*DP) as (_, url):
            ws_url = url.replace("http://", "ws://") + "/v1/stream"
            record: dict = {}
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(generate, ws_url, f"hello {i}", 100_000, record, f"u{i}")

                async def both_busy() -> bool:
                    rows = await cores(url)
                    return all(c["up"] and c["running"] > 0 for c in rows)
                await until(both_busy, "streams on both cores")
                victim = (await cores(url))[1]["pid"]
                os.kill(victim, signal.SIGKILL)

                async def some_lost() -> bool:
                    return any(f and f[-1]["type"] == "done" for f in record.values())
                await until(some_lost, "the dead core's streams ended")
                rows = await cores(url)
                assert rows[0]["up"] and rows[0]["running"] > 0  # the other core's streams go on
                frames = await generate(ws_url, "a new user", 4)  # and it takes new work
                assert frames[-1]["finish_reason"] == "length"

                async def restarted() -> bool:
                    rows = await cores(url)
                    return rows[1]["up"] and rows[1]["pid"] != victim
                await until(restarted, "the supervisor started the core again", timeout=60)
                frames = await generate(ws_url, "another user", 4)
                assert frames[-1]["finish_reason"] == "length"
                nursery.cancel_scope.cancel()
            ended = {rid: f for rid, f in record.items() if f and f[-1]["type"] == "done"}
            assert 0 < len(ended) < 8
            for frames in ended.values():
                errors = [f for f in frames if f["type"] == "error"]
                assert errors and errors[0]["code"] == "unavailable", frames[-3:]

            async def kv_back() -> bool:
                status, health = await get_json(url, "/healthz")
                return status == 200 and health["kv"]["free_blocks"] == health["kv"]["total_blocks"]
            await until(kv_back, "KV back to total on both cores")


def test_data_parallel_needs_front_ends():
    result = subprocess.run([sys.executable, "-m", "streamer", "serve", "--model", "random:tiny-qwen3",
                             "--data-parallel-size", "2", "--frontends", "0"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "--data-parallel-size needs front-end processes" in result.stderr


def test_each_core_gets_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert core_environments(2, None) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    assert core_environments(3, "cuda") == [{"CUDA_VISIBLE_DEVICES": v} for v in ("4", "6", "7")]
    assert core_environments(2, "cpu") == [{}, {}]
    assert core_environments(1, "cuda:2") == [{}]
    with pytest.raises(ValueError, match="needs 4 GPUs, one a core; 3 visible"):
        core_environments(4, None)
    assert core_environments(4, None, share=True, kv_memory=20) == [
        {"CUDA_VISIBLE_DEVICES": v} for v in ("4", "6", "7", "4")]
    with pytest.raises(ValueError, match="--share-gpus needs --kv-memory in GiB"):
        core_environments(4, None, share=True, kv_memory=0.5)
    with pytest.raises(ValueError, match="use --device cuda, not cuda:1"):
        core_environments(2, "cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert core_environments(2, None) == [{}, {}]
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        core_environments(2, "cuda")


async def test_cores_split_by_tensor_parallel_ranks_answer_as_one_process():
    """--data-parallel-size 2 --tensor-parallel-size 2 on the CPU: four model processes, two per
    core; greedy answers equal those of one core in one process."""
    prompts = [f"hello {i}" for i in range(4)]

    async def answers(*flags: str) -> tuple[list[list[int]], list[int]]:
        async with server_process("--model", "random:tiny-llama", *flags) as (proc, url):
            ws_url = url.replace("http://", "ws://") + "/v1/stream"
            out = []
            for prompt in prompts:
                frames = await generate(ws_url, prompt, 8)
                assert frames[-1]["finish_reason"] == "length", frames[-1]
                out.append([f["token_id"] for f in frames if f["type"] == "token"])
            rows = (await get_json(url, "/stats"))[1].get("cores") or []
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            return out, [c["requests_finished"] for c in rows]

    with trio.fail_after(2 * TIMEOUT):
        split, per_core = await answers(*DP, "--tensor-parallel-size", "2")
        whole, _ = await answers("--frontends", "0")
    assert split == whole
    assert per_core == [2, 2]
