"""The load generator (tools/loadgen.py): what it sends shapes what a sweep measures. Its modes run
against a real server on 127.0.0.1 port 0 (random:tiny-qwen3), with few, short requests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
from netutil import running_server

from web.config import WebConfig
from web.lifecycle import OpenCount

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import loadgen  # noqa: E402

TIMEOUT = 60  # each run is a few seconds on a 2-core box; this only bounds a hang
N = 4


def test_each_load_level_has_prompt_texts_of_its_own():
    """Same lengths at every level, different words: with one text for all levels, each level after
    the first found its prompts in the server's prefix cache and prefilled less than it should."""
    levels = [loadgen.workload_prompts(loadgen.WORKLOAD_FILE, 30, None, None, 1.3, text_seed=k) for k in (0, 1, 2)]
    for other in levels[1:]:
        assert [(p["_target"], p["max_tokens"]) for p in other] == [(p["_target"], p["max_tokens"]) for p in levels[0]]
        assert all(a["prompt"].split()[:3] != b["prompt"].split()[:3] for a, b in zip(levels[0], other, strict=True))
    assert levels[1] == loadgen.workload_prompts(loadgen.WORKLOAD_FILE, 30, None, None, 1.3, text_seed=1)  # reproducible


def test_processes_split_the_load():
    """Open loop: arrival i to process i % P at rate / P; closed loop: client j in process j % P, with
    its requests; shared sockets split too; each process draws arrival times from a seed of its own."""
    prompts = [{"prompt": str(i), "_target": 1} for i in range(10)]
    args = loadgen.parse_args(["--rates", "1", "--processes", "2", "--connections", "3", "--seed", "7"])
    shares = loadgen.split(args, prompts, 4.0, None, "4 req/s")
    assert [s.rate for s in shares] == [2.0, 2.0] and [s.seed for s in shares] == [7, 8]
    assert [s.connections for s in shares] == [2, 1]
    assert [[p["prompt"] for p in s.prompts] for s in shares] == [list("02468"), list("13579")]
    shares = loadgen.split(args, prompts, None, 3, "3 clients")
    assert [s.concurrency for s in shares] == [2, 1]
    assert sorted(len(s.prompts) for s in shares) == [3, 7] and sum(len(s.prompts) for s in shares) == 10
    assert len(loadgen.split(args, prompts, None, 1, "1 client")) == 1  # never a process without clients


@pytest.mark.parametrize("argv", [["--connections", "-1"], ["--processes", "2", "--connections", "1"],
                                  ["--api", "openai", "--connections", "2"], ["--api", "openai", "--batch"],
                                  ["--processes", "0"]])
def test_bad_modes_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        loadgen.parse_args(["--rates", "1", *argv])


class CountingOpen(OpenCount):
    """The server's count of open /v1/stream sockets, also counting every socket ever opened."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = 0

    def open(self) -> None:
        self.opened += 1
        super().open()


async def run_loadgen(server, *argv: str) -> dict:
    """One load level against `server`; the server's websockets opened meanwhile are counted."""
    sockets = server.lifecycle.sockets = CountingOpen()  # web/ws.py opens it per socket
    args = loadgen.parse_args(["--url", server.http, "--num-requests", str(N), "--cap-prompt", "12",
                               "--cap-output", "4", "--duration", "30", "--drain", "30", *argv])
    with trio.fail_after(TIMEOUT):
        [result] = await loadgen.main(args)
    result["server_sockets"] = sockets.opened
    return result


async def test_default_opens_a_websocket_per_request():
    async with running_server() as server:
        result = await run_loadgen(server, "--concurrency", "2")
    assert result["sent"] == result["completed"] == N
    assert result["server_sockets"] == N + 1  # and the calibration probe's
    assert result["connections"] == N  # the client's record: a local address:port per request
    assert result["client"]["ttft"]["count"] == N
    assert result["transport"] == "a websocket per request"
    assert "client: a websocket per request" in loadgen.report.table(result)


async def test_shared_connections_multiplex_the_requests():
    async with running_server() as server:
        result = await run_loadgen(server, "--rates", "20", "--connections", "2", "--batch")
    assert result["sent"] == result["completed"] == N
    assert result["server_sockets"] == 2 + 1
    assert result["connections"] == 2
    assert result["client"]["ttft"]["count"] == N


async def test_openai_streams_over_a_connection_per_request():
    async with running_server() as server:
        result = await run_loadgen(server, "--rates", "20", "--api", "openai")
    assert result["sent"] == result["completed"] == N
    assert result["server_sockets"] == 0  # no websocket, not even for the calibration probe
    assert result["connections"] == N
    # A token whose text is empty (the random model makes some) sends no event: at most the server's counts.
    client, server = result["client"], result["server"]
    assert 1 <= client["ttft"]["count"] <= N and server["ttft"]["count"] == N
    assert 1 <= client["itl"]["count"] <= server["itl"]["count"]
    assert client["queue"]["count"] == 0  # only /v1/stream's done frame carries the server's timing


async def test_processes_merge_every_workers_samples():
    async with running_server() as server:
        result = await run_loadgen(server, "--rates", "20", "--processes", "2")
    assert result["sent"] == result["completed"] == N
    assert [p["requests"] for p in result["client_processes"]] == [N // 2, N // 2]
    assert all(p["cpu_share"] >= 0 for p in result["client_processes"])
    assert result["client"]["ttft"]["count"] == result["client"]["e2e"]["count"] == N
    assert result["server_sockets"] == N + 1 and result["connections"] == N
    assert "2 processes" in loadgen.report.table(result)


async def test_idle_sockets_stay_open_through_the_levels(monkeypatch, capsys):
    """--idle-sockets: silent websockets opened before the first level, split over the client
    processes, held through it (the server counts them open before and after the level's requests)
    and closed at the end."""
    seen = []  # the server's open sockets whenever loadgen waits for it to be idle: before and after a level
    real_wait_idle = loadgen.wait_idle

    async def wait_idle(http: str, limit_s: float = 30.0) -> dict:
        stats = await real_wait_idle(http, limit_s)
        seen.append(server.lifecycle.sockets.value)
        return stats

    monkeypatch.setattr(loadgen, "wait_idle", wait_idle)
    async with running_server() as server:
        result = await run_loadgen(server, "--rates", "20", "--processes", "2", "--idle-sockets", "30")
        with trio.fail_after(10):
            await server.lifecycle.sockets.wait_zero()  # closed at the end
    assert result["sent"] == result["completed"] == N
    assert result["idle_sockets"] == {"requested": 30, "opened": 30, "failed": 0, "failures": {}, "open": 30,
                                      "dropped": 0, "drops": {}, "open_s": result["idle_sockets"]["open_s"]}
    assert result["server_sockets"] == 30 + N + 1  # and the calibration probe's
    assert len(seen) == 2 and all(n >= 30 for n in seen)
    out = capsys.readouterr().out
    assert "idle sockets: 30/30 open before the first level" in out
    assert "idle sockets: 30/30 still open (30 opened in" in out


async def test_idle_sockets_report_failures_and_drops():
    """A refused handshake counts by its status; a socket the server closes (here its idle timeout,
    which pings do not reset) counts as dropped, by its close code."""
    async with running_server(web=WebConfig(idle_timeout=0.3, ping_interval=0.1)) as server:
        idle = loadgen.IdleSockets(server.ws.replace("/v1/stream", "/nowhere"), 3)
        async with trio.open_nursery() as nursery:
            await idle.connect(nursery)
        assert (idle.opened, idle.failures) == (0, {"http_404": 3})

        with trio.fail_after(10):
            async with loadgen.hold_idle(server.ws, 2) as idle:
                assert len(idle.open) == 2
                while idle.open:
                    await trio.sleep(0.05)
    snap = idle.snapshot()
    assert (snap["opened"], snap["failed"], snap["open"], snap["dropped"]) == (2, 0, 0, 2)
    assert snap["drops"] == {"4408 idle timeout": 2}


def test_idle_sockets_that_cannot_fit_stop_with_the_reason():
    with pytest.raises(SystemExit, match="is to hold 1000000000 idle sockets, but it may open only"):
        loadgen.raise_fd_limit(10**9, "this process")
