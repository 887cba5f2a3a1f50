"""Load generator: clients on loopback against a running server, each request as a chat user sends it.

By default every request opens a websocket of its own to /v1/stream (sends `generate`, reads to
`done`, closes), so the per-socket cost is part of the load; `--connections K` multiplexes the
requests over K shared sockets instead, and `--api openai` sends each over an HTTP connection of its
own to the OpenAI door, streamed as server-sent events. Open-loop Poisson arrivals at each --rates
value, or closed-loop --concurrency; `--processes P` splits the clients over P processes when one
cannot keep up; `--idle-sockets N` holds N more websockets open through every level that send
nothing, as chat users who opened the page and say nothing. Prompts shaped like gpu/workload.json or
read from a file of chat prompts. Prints client- and server-side percentiles side by side; writes
JSON and a PNG plot.

    python -m streamer serve --model random:tiny-qwen3 --port 8123 &
    python tools/loadgen.py --url http://127.0.0.1:8123 --rates 1,2 --num-requests 30
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    open_websocket_url,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools")]
import loadgen_report as report  # noqa: E402
from workload import WORKLOAD_FILE, load_spec, requests  # noqa: E402

# Short common words: about one token each (with their leading space) for BPE tokenizers.
WORDS = ("the of and to in is it that for on was with as be at by this had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any my "
         "now such like our over man me even most made after also did many before must through back years where "
         "much your way well down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three").split()
# Request fields the OpenAI door takes (web/openai_api.py refuses others); /v1/stream's greedy default
# is sent explicitly there, where the default temperature is 1.
OPENAI_FIELDS = {"prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "priority"}
IDLE_HANDSHAKES = 200  # --idle-sockets: handshakes in flight at once, per process
IDLE_CONNECT_S = 30.0  # one idle socket's handshake, before it counts as failed
FD_HEADROOM = 256  # descriptors a process keeps beside its idle sockets, for the load's own connections


def text_of_length(n_tokens: int, tokens_per_word: float, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(n_tokens / tokens_per_word))))


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"probe request failed: {exc.code}: {exc.read().decode(errors='replace')}") from None


async def tokens_per_word(args) -> float:
    """The protocol takes text, and the server's tokenizer is not ours to load: one probe request
    (max_tokens 1), through the door under test, reports how many tokens our words make."""
    words = 200
    prompt = text_of_length(words, 1.0, random.Random(1))
    if args.api == "openai":
        body = {"model": args.model, "prompt": prompt, "max_tokens": 1}
        answer = await trio.to_thread.run_sync(_post_json, f"{args.url}/v1/completions", body)
        return answer["usage"]["prompt_tokens"] / words
    async with open_websocket_url(ws_url(args.url, False)) as ws:
        await ws.send_message(json.dumps({"type": "generate", "id": "probe", "prompt": prompt, "max_tokens": 1}))
        while (frame := json.loads(await ws.get_message()))["type"] not in ("done", "error"):
            pass
    if frame["type"] == "error":
        raise SystemExit(f"probe request failed: {frame['code']}: {frame['message']}")
    return frame["usage"]["prompt_tokens"] / words


def workload_prompts(path: Path, n: int, cap_prompt: int | None, cap_output: int | None, tpw: float,
                     text_seed: int = 0) -> list[dict]:
    """The workload's first n requests as prompts of about their lengths, in words drawn with
    `text_seed`. Each load level takes its own seed: with the same texts, every level after the
    first found its prompts in the server's prefix cache (on by default). (Offset from the
    calibration probe's seed, whose words would otherwise open the first prompt.)"""
    rng = random.Random(10_000 + text_seed)
    out = []
    for item in requests(load_spec(path), n):
        plen = min(len(item.prompt), cap_prompt or len(item.prompt))
        olen = min(item.output_len, cap_output or item.output_len)
        out.append({"prompt": text_of_length(plen, tpw, rng), "max_tokens": olen, "ignore_eos": True,
                    "_target": plen})
    return out


def file_prompts(path: Path, max_tokens: int) -> list[dict]:
    """One prompt per line: plain text (a user message), or JSON with `prompt` or `messages`."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line) if line.lstrip().startswith("{") else {"messages": [{"role": "user", "content": line}]}
        out.append({"max_tokens": max_tokens, **obj, "_target": 0})
    return out


def ws_url(http: str, batch: bool) -> str:
    url = http.replace("http://", "ws://").replace("https://", "wss://") + "/v1/stream"
    return url + "?batch=1" if batch else url


def _new_outcome(body: dict, outcomes: list) -> report.Outcome:
    outcome = report.Outcome(time.monotonic(), body["_target"], priority=body.get("priority", 0))
    outcomes.append(outcome)
    return outcome


def _generate(rid: str, body: dict) -> str:
    return json.dumps({"type": "generate", "id": rid, **{k: v for k, v in body.items() if not k.startswith("_")}})


def _frames(message: str) -> list[dict]:
    data = json.loads(message)
    return data if isinstance(data, list) else [data]  # ?batch=1: arrays of frames


def _endpoint(ws) -> str:
    return f"{ws.local.address}:{ws.local.port}"


def record(outcome: report.Outcome, frame: dict, now: float) -> bool:
    """Note one /v1/stream frame of the outcome's request; True once the request has ended."""
    if frame["type"] == "token":
        outcome.token_times.append(now)
    elif frame["type"] == "error":
        outcome.error = frame["code"]
        if not outcome.token_times:  # refused before starting: no done frame follows
            outcome.t_done = now
            return True
    elif frame["type"] == "done":
        outcome.done, outcome.t_done = frame, now
        return True
    return False


async def _messages(ws):
    while True:
        try:
            yield await ws.get_message()
        except ConnectionClosed:
            return


async def ws_request(url: str, rid: str, body: dict, outcomes: list) -> None:
    """One request on a websocket of its own, as a chat page sends it. The clock starts before the
    handshake: the user waits for it too, so TTFT includes the connection's cost."""
    outcome = _new_outcome(body, outcomes)
    try:
        # Large queue: we read at once; backpressure here would distort the timings.
        async with open_websocket_url(url, message_queue_size=4096) as ws:
            outcome.conn = _endpoint(ws)
            await ws.send_message(_generate(rid, body))
            async for message in _messages(ws):
                now = time.monotonic()
                if any(record(outcome, frame, now) for frame in _frames(message)):
                    return  # leaving the block closes the socket
    except (OSError, HandshakeError, ConnectionClosed):
        pass  # the close after `done` may time out; that request still counts
    if outcome.t_done is None:  # the handshake failed, or the socket closed before `done`
        outcome.error, outcome.t_done = "connect" if outcome.conn is None else "closed", time.monotonic()


class Connection:
    """One websocket carrying many generations (--connections); a reader task routes frames."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.pending: dict[str, tuple[report.Outcome, trio.Event]] = {}

    async def read(self) -> None:
        async for message in _messages(self.ws):
            now = time.monotonic()
            for frame in _frames(message):
                entry = self.pending.get(frame.get("id"))
                if entry is not None and record(entry[0], frame, now):
                    del self.pending[frame["id"]]
                    entry[1].set()

    async def request(self, rid: str, body: dict, outcomes: list) -> None:
        outcome = _new_outcome(body, outcomes)
        outcome.conn = _endpoint(self.ws)
        event = trio.Event()
        self.pending[rid] = (outcome, event)
        await self.ws.send_message(_generate(rid, body))
        await event.wait()


async def _open(url: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with open_websocket_url(url, message_queue_size=4096) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


async def sse_request(client, base: str, model: str, rid: str, body: dict, outcomes: list) -> None:
    """One request through the OpenAI door, streamed, on an HTTP connection of its own: each
    server-sent chunk with text is a token's arrival (a token whose text waits for the rest of a
    UTF-8 character comes with the next chunk)."""
    import httpx

    chat = "messages" in body
    payload = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
               **{k: v for k, v in body.items() if k in OPENAI_FIELDS}}
    outcome = _new_outcome(body, outcomes)
    finish, usage = None, {}
    try:
        async with client.stream("POST", f"{base}/v1/{'chat/completions' if chat else 'completions'}",
                                 json=payload) as r:
            host, port = r.extensions["network_stream"].get_extra_info("client_addr")[:2]
            outcome.conn = f"{host}:{port}"
            if r.status_code != 200:  # refused: an OpenAI error body
                text = await r.aread()
                try:
                    outcome.error = json.loads(text)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    outcome.error = f"http_{r.status_code}"
            else:
                async for line in r.aiter_lines():
                    now = time.monotonic()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:  # mid-stream the status line is long gone
                        outcome.error = chunk["error"]["code"]
                    for choice in chunk.get("choices", ()):
                        if choice["delta"].get("content") if chat else choice.get("text"):
                            outcome.token_times.append(now)
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage") or usage
    except httpx.HTTPError:
        outcome.error = "connect" if outcome.conn is None else "closed"
    outcome.t_done = time.monotonic()
    if finish is not None:
        outcome.done = {"finish_reason": finish, "usage": usage, "timing": {}}  # as a /v1/stream done frame


@dataclass(frozen=True)
class Share:
    """One client process's part of a load level (JSON-able: a worker process gets it on stdin)."""

    url: str
    api: str  # "stream" or "openai"
    model: str | None  # the served model's name (the OpenAI door requires it)
    connections: int  # 0: a connection per request; else websockets shared by this process's requests
    batch: bool
    duration: float
    drain: float
    rate: float | None  # open loop: this process's arrival rate
    concurrency: int | None  # closed loop: this process's clients
    seed: int
    worker: int
    label: str
    prompts: list[dict]


@asynccontextmanager
async def transport(share: Share):
    """`send(slot, rid, body, outcomes)` for the share's requests, by --api and --connections; `slot`
    (arrival number, or client number) picks the shared socket."""
    if share.api == "openai":
        import httpx

        # No pool limit (a queue in the client would distort TTFT), and no connection is kept for reuse.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=None) as client:
            yield lambda slot, rid, body, outcomes: sse_request(client, share.url, share.model, rid, body, outcomes)
    elif share.connections == 0:
        url = ws_url(share.url, share.batch)
        yield lambda slot, rid, body, outcomes: ws_request(url, rid, body, outcomes)
    else:
        async with trio.open_nursery() as nursery:
            conns = []
            for _ in range(share.connections):
                conn = Connection(await nursery.start(_open, ws_url(share.url, share.batch)))
                nursery.start_soon(conn.read)
                conns.append(conn)
            yield lambda slot, rid, body, outcomes: conns[slot % len(conns)].request(rid, body, outcomes)
            nursery.cancel_scope.cancel()  # closes the sockets: the server cancels what is left


def _failure(exc: BaseException) -> str:
    """Why an idle socket did not open: the status the server refused the handshake with, a
    timeout, or the underlying error's type (and errno name), e.g. `ConnectionRefusedError (ECONNREFUSED)`."""
    if isinstance(exc, ConnectionRejected):
        return f"http_{exc.status_code}"
    if isinstance(exc, ConnectionTimeout):
        return "handshake_timeout"
    cause = exc
    while getattr(cause, "errno", None) is None:  # trio: HandshakeError from OSError from a group of attempts
        inner = cause.exceptions[0] if isinstance(cause, BaseExceptionGroup) else cause.__cause__
        if inner is None:
            break
        cause = inner
    name = errno.errorcode.get(getattr(cause, "errno", None) or 0)
    return f"{type(cause).__name__} ({name})" if name else type(cause).__name__


def _closed(reason) -> str:
    """A close the server sent (or a connection lost), e.g. `4408 idle timeout`, `1006 ABNORMAL_CLOSURE`."""
    return f"{reason.code} {reason.reason or reason.name}" if reason is not None else "closed"


class IdleSockets:
    """--idle-sockets: chat users who opened the page and say nothing. Each holds a websocket to
    /v1/stream and reads it (nothing is expected; trio-websocket answers the server's pings in the
    background meanwhile) until it closes; one the server closed before we did counts as dropped,
    by its close code."""

    def __init__(self, url: str, requested: int) -> None:
        self.url, self.requested = url, requested
        self.opened, self.failures, self.drops = 0, Counter(), Counter()
        self.open: set = set()
        self.open_s = 0.0  # how long opening them all took
        self.closing = False
        self._settled, self._all_settled = 0, trio.Event()

    async def connect(self, nursery: trio.Nursery) -> None:
        """Start them all in `nursery`, at most IDLE_HANDSHAKES handshakes at a time; return once
        each one opened or failed."""
        t0, slots = time.monotonic(), trio.Semaphore(IDLE_HANDSHAKES)
        if self.requested:
            for _ in range(self.requested):
                nursery.start_soon(self._user, slots)
            await self._all_settled.wait()
        self.open_s = time.monotonic() - t0

    def _settle(self, slots: trio.Semaphore) -> None:
        slots.release()
        self._settled += 1
        if self._settled == self.requested:
            self._all_settled.set()

    def _drop(self, ws, why: str) -> None:
        """The socket is gone: a drop, unless we are closing them."""
        if ws in self.open:
            self.open.discard(ws)
            if not self.closing:
                self.drops[why] += 1

    async def _user(self, slots: trio.Semaphore) -> None:
        ws = None
        await slots.acquire()
        try:
            async with open_websocket_url(self.url, connect_timeout=IDLE_CONNECT_S) as ws:
                self._settle(slots)
                self.opened += 1
                self.open.add(ws)
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed as exc:
                    self._drop(ws, _closed(exc.reason))
        # Any error: one user's socket failing is counted, never the end of the run.
        except Exception as exc:
            if ws is None:
                self._settle(slots)
                self.failures[_failure(exc)] += 1
            else:
                self._drop(ws, type(exc).__name__)
        finally:
            self.open.discard(ws)  # cancelled: hold_idle is closing them

    def close(self) -> None:
        """Mark the end: what closes from here on is no drop. (hold_idle then cancels them: each
        socket's TCP connection closes without a close handshake, as a closed tab's or a lost
        network's does. A handshake would race the server's pings: trio-websocket answers a ping
        that arrives after our close frame with a pong wsproto refuses to send, and the reader task
        fails; python-trio/trio-websocket#184.)"""
        self.closing = True

    def snapshot(self) -> dict:
        return {"requested": self.requested, "opened": self.opened, "failed": sum(self.failures.values()),
                "failures": dict(self.failures), "open": len(self.open), "dropped": sum(self.drops.values()),
                "drops": dict(self.drops), "open_s": round(self.open_s, 2)}


def merge_idle(snapshots: list[dict]) -> dict:
    """The client processes' idle-socket counts as one."""
    out = {"requested": 0, "opened": 0, "failed": 0, "failures": Counter(), "open": 0, "dropped": 0,
           "drops": Counter(), "open_s": 0.0}
    for snap in snapshots:
        for key in ("requested", "opened", "failed", "open", "dropped"):
            out[key] += snap[key]
        out["failures"].update(snap["failures"])
        out["drops"].update(snap["drops"])
        out["open_s"] = max(out["open_s"], snap["open_s"])
    return {**out, "failures": dict(out["failures"]), "drops": dict(out["drops"])}


def idle_line(idle: dict) -> str:
    def reasons(counts: dict) -> str:
        return f" ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})" if counts else ""

    return (f"idle sockets: {idle['open']}/{idle['requested']} still open ({idle['opened']} opened in "
            f"{idle['open_s']:g} s; {idle['failed']} refused or failed{reasons(idle['failures'])}; "
            f"{idle['dropped']} dropped by the server{reasons(idle['drops'])})")


def raise_fd_limit(sockets: int, who: str) -> None:
    """Raise this process's soft limit on open files to its hard limit; stop here, with the reason,
    if `sockets` idle sockets and FD_HEADROOM more descriptors would not fit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 16
    if soft != resource.RLIM_INFINITY and sockets + in_use + FD_HEADROOM > soft:
        raise SystemExit(
            f"--idle-sockets: {who} is to hold {sockets} idle sockets, but it may open only {soft} files "
            f"(hard limit {hard}; {in_use} open already, {FD_HEADROOM} kept for the load's own "
            f"connections): raise the hard limit (ulimit -Hn as root, LimitNOFILE= in a systemd unit, "
            f"--ulimit nofile= for docker) or spread them over more --processes")


@asynccontextmanager
async def hold_idle(url: str, n: int):
    """The IdleSockets of this process, open (or failed) on entry, held through the block, closed on
    leaving it."""
    idle = IdleSockets(url, n)
    async with trio.open_nursery() as nursery:
        await idle.connect(nursery)
        try:
            yield idle
        finally:
            idle.close()
            nursery.cancel_scope.cancel()


async def progress(label: str, total: int, outcomes: list, t0: float, tty: bool) -> None:
    """A bar redrawn in place on a terminal; a line every 5 s otherwise (logs, CI, worker processes)."""
    while True:
        done = sum(o.t_done is not None for o in outcomes)
        errors = sum(o.error is not None for o in outcomes)
        bar = "#" * (30 * done // max(1, total))
        print(f"{label:>14} [{bar:<30}] {done}/{total} done, {len(outcomes) - done} in flight, "
              f"{errors} errors, {time.monotonic() - t0:5.1f} s", end="\r" if tty else "\n", file=sys.stderr,
              flush=True)
        await trio.sleep(0.25 if tty else 5.0)


async def drive(share: Share, tty: bool) -> dict:
    """Send one process's share of a level; its outcomes, and the CPU this process spent doing it.
    `tty`: redraw the progress bar in place (one process on a terminal)."""
    outcomes: list[report.Outcome] = []
    n = len(share.prompts)
    ids = (f"w{share.worker}r{i}" for i in itertools.count())
    cpu0, t0 = time.process_time(), time.monotonic()
    async with trio.open_nursery() as outer, transport(share) as send:
        t_first, t0_trio = time.monotonic(), trio.current_time()  # trio's clock has its own origin
        outer.start_soon(progress, share.label, n, outcomes, t_first, tty)
        # Sending stops at --duration; stragglers get --drain more seconds, then count as timeouts.
        with trio.move_on_after(share.duration + share.drain):
            async with trio.open_nursery() as nursery:
                if share.rate:
                    rng, t = random.Random(share.seed), 0.0
                    for i in range(n):
                        t += rng.expovariate(share.rate)
                        if t > share.duration:
                            break
                        await trio.sleep_until(t0_trio + t)
                        nursery.start_soon(send, i, next(ids), share.prompts[i], outcomes)
                else:
                    queue = iter(range(n))

                    async def client(slot: int) -> None:
                        for i in queue:
                            if time.monotonic() - t_first > share.duration:
                                return
                            await send(slot, next(ids), share.prompts[i], outcomes)

                    for slot in range(share.concurrency):
                        nursery.start_soon(client, slot)
        outer.cancel_scope.cancel()
    if tty:
        print(file=sys.stderr)
    for o in outcomes:
        if o.t_done is None:
            o.error = "timeout"
    t1 = time.monotonic()
    return {"worker": share.worker, "outcomes": outcomes, "t0": t0, "t1": t1,
            "cpu_s": time.process_time() - cpu0, "wall_s": t1 - t0}


def split(args, prompts: list[dict], rate: float | None, concurrency: int | None, label: str) -> list[Share]:
    """The level's load over --processes: arrival i (or client j's requests) to process i % P, each at
    rate / P or with its share of the clients, on arrival times of a seed of its own."""
    n = min(args.num_requests, len(prompts))
    p = args.processes if rate else min(args.processes, concurrency)
    owner = (lambda i: i % p) if rate else (lambda i: i % concurrency % p)  # client j lives in process j % P
    return [Share(url=args.url, api=args.api, model=args.model, connections=len(range(w, args.connections, p)),
                  batch=args.batch, duration=args.duration, drain=args.drain, rate=rate / p if rate else None,
                  concurrency=len(range(w, concurrency, p)) if concurrency else None, seed=args.seed + w, worker=w,
                  label=label if p == 1 else f"{label} w{w}", prompts=[prompts[i] for i in range(n) if owner(i) == w])
            for w in range(p)]


class Lines:
    """Newline-ended messages on a trio stream: a client process's stdout, or its stdin there."""

    def __init__(self, stream) -> None:
        self.stream, self.buf, self.scanned = stream, bytearray(), 0

    async def get(self) -> bytes | None:
        """The next line, without its newline; None at the end of the stream."""
        while (i := self.buf.find(b"\n", self.scanned)) < 0:
            self.scanned = len(self.buf)
            chunk = await self.stream.receive_some()
            if not chunk:
                return None
            self.buf += chunk
        line = bytes(self.buf[:i])
        del self.buf[:i + 1]
        self.scanned = 0
        return line


def _run_json(run: dict) -> bytes:
    return json.dumps({**run, "outcomes": [asdict(o) for o in run["outcomes"]]}).encode()


def _run_from_json(line: bytes) -> dict:
    run = json.loads(line)
    run["outcomes"] = [report.Outcome(**o) for o in run["outcomes"]]
    return run


class Clients:
    """Where the levels' shares run, kept through every level: this process (--processes 1), or P
    client processes (`loadgen.py --worker`, started once). Each holds its part of the idle sockets."""

    def __init__(self, idle: IdleSockets | None = None, procs: list | None = None) -> None:
        self.local_idle, self.procs = idle, procs or []
        self.out = [Lines(proc.stdout) for proc in self.procs]

    async def _send(self, w: int, message: bytes) -> None:
        await self.procs[w].stdin.send_all(message + b"\n")

    async def _get(self, w: int) -> bytes:
        line = await self.out[w].get()
        if line is None:
            raise RuntimeError(f"client process {w} exited ({await self.procs[w].wait()}): see its stderr")
        return line

    async def _each(self, fn, n: int | None = None) -> list:
        """fn(w) for the first n processes (all by default) at once; their answers in order."""
        answers: list = [None] * (len(self.procs) if n is None else n)

        async def one(w: int) -> None:
            answers[w] = await fn(w)

        async with trio.open_nursery() as nursery:
            for w in range(len(answers)):
                nursery.start_soon(one, w)
        return answers

    async def ask(self, message: bytes) -> list[bytes]:
        async def one(w: int) -> bytes:
            await self._send(w, message)
            return await self._get(w)

        return await self._each(one)

    async def run(self, shares: list[Share]) -> list[dict]:
        """One level. In processes: each gets its share and says `ready`; once all have, each gets
        `go`, and answers its samples as a line of JSON."""
        if not self.procs:
            return [await drive(shares[0], sys.stderr.isatty())]
        ready, go = [0], trio.Event()

        async def one(w: int) -> dict:
            await self._send(w, json.dumps(asdict(shares[w])).encode())
            if await self._get(w) != b"ready":
                raise RuntimeError(f"client process {w}: expected `ready`")
            ready[0] += 1
            if ready[0] == len(shares):
                go.set()
            await go.wait()
            await self._send(w, b"go")
            return _run_from_json(await self._get(w))

        return await self._each(one, len(shares))  # a closed-loop level with fewer clients leaves some idle

    async def idle(self) -> dict:
        """The idle sockets' counts now, over every process."""
        if not self.procs:
            return self.local_idle.snapshot()
        return merge_idle([json.loads(line) for line in await self.ask(b"idle")])


@asynccontextmanager
async def clients(args):
    """The Clients for a run, with --idle-sockets open before the first level and closed after the last."""
    url, n, p = ws_url(args.url, False), args.idle_sockets, args.processes
    if p == 1:
        async with hold_idle(url, n) as idle:
            yield Clients(idle=idle)
        return
    procs = []
    try:
        for _ in range(p):
            procs.append(await trio.lowlevel.open_process([sys.executable, __file__, "--worker"],
                                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        pool = Clients(procs=procs)

        async def hello(w: int) -> bytes:
            await pool._send(w, json.dumps({"worker": w, "api": args.api, "url": url,
                                            "idle_sockets": len(range(w, n, p))}).encode())
            return await pool._get(w)  # once its idle sockets are open (or failed)

        await pool._each(hello)
        yield pool
        await pool._each(lambda w: pool._send(w, b"close"))
        for w, proc in enumerate(procs):
            if await proc.wait() != 0:
                raise RuntimeError(f"client process {w} failed ({proc.returncode}): see its stderr")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()


def _import_httpx() -> None:
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise SystemExit("--api openai needs httpx: pip install httpx") from None


async def worker_loop() -> None:
    """`loadgen.py --worker`, one client process of --processes P (Clients starts them). On stdin,
    a line each: first its part ({worker, api, url, idle_sockets}), answered with its idle sockets'
    counts once they are open; then per level a Share, answered `ready`, then `go`, answered with
    its run; `idle`, answered with the counts; `close` (or the end of stdin) closes the idle sockets
    and exits. Every answer is one line on stdout."""
    stdin = Lines(trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())))

    def answer(data: bytes) -> None:
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.buffer.flush()

    part = json.loads(await stdin.get() or b"null")
    if part is None:
        return
    if part["api"] == "openai":
        _import_httpx()
    if part["idle_sockets"]:
        raise_fd_limit(part["idle_sockets"], f"client process {part['worker']}")
    async with hold_idle(part["url"], part["idle_sockets"]) as idle:
        answer(json.dumps(idle.snapshot()).encode())
        while (line := await stdin.get()) not in (None, b"close"):
            if line == b"idle":
                answer(json.dumps(idle.snapshot()).encode())
                continue
            share = Share(**json.loads(line))
            answer(b"ready")
            if await stdin.get() != b"go":
                return
            answer(_run_json(await drive(share, False)))


def get_stats(http: str) -> dict:
    return _get_json(f"{http}/stats?hdr=1")


async def wait_idle(http: str, limit_s: float = 30.0) -> dict:
    """The server's stats once nothing runs or waits (so every request's e2e is recorded)."""
    with trio.move_on_after(limit_s):
        while True:
            stats = await trio.to_thread.run_sync(get_stats, http)
            if stats["running"] == 0 and stats["waiting"] == 0:
                return stats
            await trio.sleep(0.1)
    return await trio.to_thread.run_sync(get_stats, http)


def output_tokens(o: report.Outcome) -> int:
    """The server's count where it finished (an SSE event carries no token with empty text), else
    the tokens that arrived."""
    usage = (o.done or {}).get("usage") or {}
    return usage.get("completion_tokens", len(o.token_times))


def transport_name(args) -> str:
    if args.api == "openai":
        return "OpenAI SSE, an HTTP connection per request"
    name = "a websocket per request" if args.connections == 0 else f"{args.connections} shared websockets"
    return name + " (?batch=1)" if args.batch else name


async def run_one(args, pool: Clients, prompts: list[dict], rate: float | None, concurrency: int | None) -> dict:
    """One load level: open loop at `rate` req/s, or closed loop with `concurrency` clients."""
    before = await wait_idle(args.url)
    shares = split(args, prompts, rate, concurrency, f"{rate:g} req/s" if rate else f"{concurrency} clients")
    runs = await pool.run(shares)
    after = await wait_idle(args.url)
    idle = await pool.idle()  # at the level's end: how many of the idle sockets are still open
    outcomes = [o for run in runs for o in run["outcomes"]]
    wall = max(run["t1"] for run in runs) - min(run["t0"] for run in runs)  # one monotonic clock per host
    ok = [o for o in outcomes if o.ok]
    sends = sorted(o.t_send for o in outcomes)
    prompt_tokens = [o.done["usage"]["prompt_tokens"] for o in ok if "prompt_tokens" in o.done["usage"]]
    return {
        "load": rate or concurrency, "mode": "open" if rate else "closed", "sent": len(outcomes),
        "completed": len(ok), "wall_s": round(wall, 2),
        "arrival_rate": round((len(outcomes) - 1) / (sends[-1] - sends[0]), 3) if len(sends) > 1 else None,
        "output_tok_s": round(sum(map(output_tokens, outcomes)) / wall, 1) if wall else 0.0,
        "mean_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens), 1) if prompt_tokens else None,
        "goodput": report.goodput(outcomes, args.slo_ttft_ms, args.slo_itl_ms),
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "transport": transport_name(args),
        "connections": len({o.conn for o in outcomes if o.conn}),  # distinct client (address, port) pairs
        "client_processes": [{"worker": run["worker"], "requests": len(run["outcomes"]), "cpu_s": round(run["cpu_s"], 2),
                              "cpu_share": round(run["cpu_s"] / run["wall_s"], 3) if run["wall_s"] else 0.0}
                             for run in runs],
        "client": report.client_side(outcomes), "server": report.server_side(before, after),
        "by_priority": {str(p): report.client_side([o for o in outcomes if o.priority == p])
                        for p in sorted({o.priority for o in outcomes})} if len({o.priority for o in outcomes}) > 1 else {},
        "idle_sockets": idle,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rates", help="open loop: comma-separated arrival rates in req/s (Poisson)")
    load.add_argument("--concurrency", help="closed loop: comma-separated numbers of clients")
    p.add_argument("--num-requests", type=int, default=64, help="at most this many requests per load level")
    p.add_argument("--duration", type=float, default=60.0, help="stop sending after this many seconds per level")
    p.add_argument("--drain", type=float, default=60.0, help="then wait this long for answers in flight")
    p.add_argument("--workload", type=Path, default=WORKLOAD_FILE, help="workload.json to shape prompts after")
    p.add_argument("--prompts", type=Path, help="a file of chat prompts instead (one per line, text or JSON)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens for --prompts")
    p.add_argument("--cap-prompt", type=int, help="clip workload prompt lengths (small machines)")
    p.add_argument("--cap-output", type=int, help="clip workload output lengths")
    p.add_argument("--api", choices=("stream", "openai"), default="stream",
                   help="stream: websockets to /v1/stream; openai: POST /v1/chat/completions (/v1/completions "
                   "for plain prompts) with stream: true, read as server-sent events, an HTTP connection per "
                   "request (needs httpx; TTFT and ITL from the events; ignore_eos is not sent there)")
    p.add_argument("--connections", type=int, default=0,
                   help="0: every request opens a websocket of its own and closes it after `done`, as chat "
                   "users do; K >= 1: all requests multiplexed over K shared websockets (split over "
                   "--processes; closed-loop client j uses socket j %% K)")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes: each sends its share of the arrivals (rate/P, or its share of the "
                   "clients, arrival times of its own seed); percentiles over all their samples; each one's CPU "
                   "(user+sys over wall) is printed, with a warning above 80%% of a core")
    p.add_argument("--idle-sockets", type=int, default=0, metavar="N",
                   help="idle chat users: before the first level (the warm-up too), open N websockets to "
                   "/v1/stream that send nothing, split over --processes, and hold them through every level "
                   "(the server's pings answered); closed at the end. Handshakes go at most "
                   f"{IDLE_HANDSHAKES} at a time per process; each process raises its open-file soft limit to "
                   "the hard limit and stops if its share does not fit. Each level reports how many opened, "
                   "were refused or failed (by reason) and are still open; one the server closed meanwhile "
                   "counts as dropped. The server closes a websocket silent for its --ws-idle-timeout (default "
                   "300 s; pings do not count): long enough for a benchmark, else raise it there (0: never)")
    p.add_argument("--priorities", help="comma-separated request classes, cycled over the requests "
                   "(e.g. 0,0,0,5: a quarter at class 5); per-class percentiles are printed")
    p.add_argument("--batch", action="store_true",
                   help="open /v1/stream?batch=1: the server sends the frames ready together in one message")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0)
    p.add_argument("--slo-itl-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=7, help="seed of the arrival times (process w uses seed + w)")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="first run the first level's load this many seconds, unmeasured (prompts of its own)")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "loadgen", help="JSON and PNG go here")
    args = p.parse_args(argv)
    if args.processes < 1:
        p.error("--processes must be >= 1")
    if args.idle_sockets < 0:
        p.error("--idle-sockets must be >= 0")
    if args.connections < 0 or 0 < args.connections < args.processes:
        p.error("--connections must be 0 (a websocket per request) or at least --processes (K shared ones)")
    if args.api == "openai" and (args.connections or args.batch):
        p.error("--connections and --batch are for websockets (--api stream)")
    if args.api == "openai":
        _import_httpx()  # here, not in the first request's time or CPU
    if not args.rates and not args.concurrency:
        args.rates = ",".join(str(r) for r in load_spec(args.workload)["online"]["rates_per_s"])
    args.model = None  # the served model's name, asked of the server for --api openai
    return args


async def main(args) -> list[dict]:
    if args.idle_sockets:  # before anything starts (each client process checks its own share again)
        p = args.processes
        raise_fd_limit(math.ceil(args.idle_sockets / p), "this process" if p == 1 else "each client process")
    if args.api == "openai":
        models = await trio.to_thread.run_sync(_get_json, f"{args.url}/v1/models")
        args.model = models["data"][0]["id"]
    if args.prompts:  # the file's prompts, the same at every level (so prefix-cache hits carry over)
        prompts = file_prompts(args.prompts, args.max_tokens)
        prompts = list(itertools.islice(itertools.cycle(prompts), args.num_requests))
    else:
        tpw = await tokens_per_word(args)
        print(f"calibration: {tpw:.2f} tokens per word on this server's tokenizer", file=sys.stderr)

    def level_prompts(level: int) -> list[dict]:
        """Level 0 is the warm-up; each level has texts of its own (the same lengths)."""
        out = prompts if args.prompts else workload_prompts(args.workload, args.num_requests, args.cap_prompt,
                                                            args.cap_output, tpw, text_seed=level)
        if args.priorities:  # request i gets the i-th class, cycling (the server's --policy priority uses it)
            classes = [int(p) for p in args.priorities.split(",")]
            out = [{**body, "priority": classes[i % len(classes)]} for i, body in enumerate(out)]
        return out

    if args.api == "openai" and any(body.get("ignore_eos") for body in level_prompts(0)):
        print("note: the OpenAI door takes no ignore_eos: answers may end at EOS before max_tokens", file=sys.stderr)
    levels = [(float(r), None) for r in args.rates.split(",")] if args.rates else \
             [(None, int(c)) for c in args.concurrency.split(",")]
    async with clients(args) as pool:  # the idle sockets open here, before the warm-up, until the end
        if args.idle_sockets:
            print(idle_line(await pool.idle()).replace("still open", "open before the first level"))
        return await run_levels(args, pool, levels, level_prompts)


async def run_levels(args, pool: Clients, levels: list, level_prompts) -> list[dict]:
    if args.warmup > 0:  # the first level's load, unmeasured: a fresh server pays for first calls
        warm = argparse.Namespace(**{**vars(args), "duration": args.warmup, "drain": min(args.drain, 30.0)})
        result = await run_one(warm, pool, level_prompts(0), *levels[0])
        print(f"== warm-up at the first level's load for {args.warmup:g} s: {result['completed']}/{result['sent']} "
              f"completed, {result['output_tok_s']} output tok/s (not reported)")
    results = []
    for level, (rate, concurrency) in enumerate(levels, start=1):
        result = await run_one(args, pool, level_prompts(level), rate, concurrency)
        results.append(result)
        print(f"\n== {result['mode']} loop, {result['load']:g} {'req/s offered' if rate else 'clients'}: "
              f"{result['completed']}/{result['sent']} completed in {result['wall_s']} s "
              f"(arrivals {result['arrival_rate']} req/s), "
              f"{result['output_tok_s']} output tok/s, goodput {result['goodput']:.0%} "
              f"(TTFT <= {args.slo_ttft_ms:g} ms, TPOT <= {args.slo_itl_ms:g} ms), errors {result['errors'] or 'none'}")
        print(report.table(result))
        for p, side in result["by_priority"].items():
            print(f"  priority {p:>3}: {side['ttft']['count']} requests, TTFT p50 {side['ttft']['p50_ms']} "
                  f"p99 {side['ttft']['p99_ms']} ms, ITL p99 {side['itl']['p99_ms']} ms (client)")
        if args.idle_sockets:
            print(idle_line(result["idle_sockets"]))
    return results


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:  # a client process of --processes P (clients() starts it)
        trio.run(worker_loop)
        raise SystemExit
    args = parse_args()
    results = trio.run(main, args)
    args.out.mkdir(parents=True, exist_ok=True)
    idle = results[-1]["idle_sockets"] if results else None  # after the last level
    if args.idle_sockets:
        print(f"\nafter the last level, {idle_line(idle)}")
    (args.out / "loadgen.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "idle_sockets": idle, "results": results}, indent=1))
    print(f"\nwrote {args.out / 'loadgen.json'}")
    try:
        report.plot(results, str(args.out / "loadgen.png"), "offered rate (req/s)" if args.rates else "clients")
        print(f"wrote {args.out / 'loadgen.png'}")
    except ImportError:  # e.g. a GPU box without matplotlib: plot elsewhere from the JSON
        print(f"no matplotlib here: plot later with `python tools/loadgen_report.py {args.out / 'loadgen.json'}`")
