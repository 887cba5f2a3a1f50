"""The engine core's door for front-end processes: a local socket speaking streamer/ipc.py.

`serve_core(engine, path)` accepts front ends; each connection is a `Link` that owns that front
end's table of live requests (its request number -> the engine's key) and nothing else. Messages
in become engine calls on the core's one event loop; the engine's events go out as one `Step`
message per front end per step. A front end that sends garbage or goes away has its requests
cancelled (their KV freed) and the core serves on.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

import msgspec
import structlog
import trio

from streamer import ipc
from streamer.engine import Engine
from streamer.types import FinishEvent, RequestError, SamplingParams

log = structlog.get_logger("streamer.core")


class Link:
    """One front end's connection: its requests' outbox, and the messages waiting to go to it."""

    def __init__(self, number: int, stream: trio.SocketStream) -> None:
        self.number = number
        self.stream = stream
        self.frontend: int | None = None  # from its Hello
        self.pid: int | None = None
        self.keys: dict[int, str] = {}  # request number -> engine key, while the request is live
        self.gone = False
        self.rids: list[int] = []  # this step's tokens, as parallel lists
        self.tokens: list[int] = []
        self.finished: list[ipc.Finished] = []
        self.logprobs: list[ipc.TokenLogprobs] = []
        self.replies: list = []
        self.report: dict = {}  # the front end's last Report, for /stats
        self._ready = trio.Event()

    def kick(self) -> None:
        if not self._ready.is_set():
            self._ready.set()

    def take(self) -> list:
        """The messages queued since the last call, as one frame's worth."""
        self._ready = trio.Event()
        out, self.replies = self.replies, []
        if self.rids or self.finished:
            out.append(ipc.Step(self.rids, self.tokens, self.finished, self.logprobs))
            self.rids, self.tokens, self.finished, self.logprobs = [], [], [], []
        return out

    async def wait(self) -> None:
        await self._ready.wait()


class RemoteOutbox:
    """A request's outbox inside the core: its tokens and its finish join its front end's next
    Step message. Never full (the front end enforces its clients' buffers); gone once the front
    end is."""

    __slots__ = ("link", "rid")

    def __init__(self, link: Link, rid: int) -> None:
        self.link = link
        self.rid = rid

    @property
    def reader_gone(self) -> bool:
        return self.link.gone

    def put(self, event: FinishEvent) -> bool:
        link = self.link
        if link.gone:
            return False
        link.finished.append(finished(self.rid, event))
        link.keys.pop(self.rid, None)
        link.kick()
        return True

    def put_token(self, index: int, token_id: int, text: str, logprobs=None) -> str | None:
        """A token's id joins the Step (None: taken; "cancelled": the front end is gone). The step
        loop's most frequent call."""
        link = self.link
        if link.gone:
            return "cancelled"
        if logprobs is not None:
            link.logprobs.append(ipc.TokenLogprobs(len(link.rids), logprobs.logprob, [i for i, _ in logprobs.top],
                                                   [v for _, v in logprobs.top]))
        if not link.rids:  # the first token since the writer last took them
            link.kick()
        link.rids.append(self.rid)
        link.tokens.append(token_id)
        return None

    def close(self) -> None:
        pass


def finished(rid: int, ev: FinishEvent) -> ipc.Finished:
    t, err = ev.timing, ev.error
    return ipc.Finished(rid, ev.finish_reason, ev.prompt_tokens, ev.completion_tokens, t.queue_ms, t.ttft_ms,
                        t.total_ms, t.tpot_ms, err.code if err else None, err.message if err else None)


class CoreServer:
    """The front ends of one engine: their links, and what each last reported."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.links: dict[int, Link] = {}
        self._numbers = itertools.count(1)
        self._encoder = msgspec.msgpack.Encoder()

    def welcome(self) -> ipc.Welcome:
        e = self.engine
        return ipc.Welcome(e.model_name, e.max_context, e.capacity, e.limits, e.loaded.model.spec.vocab_size,
                           e.allocator.num_blocks, e.block_size, os.getpid())

    async def handle(self, stream: trio.SocketStream) -> None:
        link = Link(next(self._numbers), stream)
        self.links[link.number] = link
        link.replies.append(self.welcome())
        link.kick()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, link, nursery.cancel_scope)
                await self._read(link)
                nursery.cancel_scope.cancel()
        finally:
            self._drop(link)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _read(self, link: Link) -> None:
        reader = ipc.FrameReader(link.stream, ipc.to_core)
        try:
            while (messages := await reader.receive()) is not None:
                for msg in messages:
                    self._on(link, msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # garbage, or a message that decodes but makes no sense: cut it off
            log.error("ipc_malformed", frontend=link.frontend, link=link.number, error=repr(exc)[:200],
                      live=len(link.keys))

    async def _write(self, link: Link, scope: trio.CancelScope) -> None:
        """One frame per wake-up: everything the step loop queued for this front end meanwhile."""
        try:
            while True:
                await link.wait()
                messages = link.take()
                if messages:
                    await link.stream.send_all(ipc.encode(messages))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            scope.cancel()

    def _drop(self, link: Link) -> None:
        """The front end left (or broke the protocol): cancel its live requests, freeing their KV."""
        link.gone = True
        self.links.pop(link.number, None)
        for key in link.keys.values():
            self.engine.cancel(key)
        log.info("frontend_left", frontend=link.frontend, link=link.number, cancelled=len(link.keys))
        link.keys.clear()

    def _on(self, link: Link, msg) -> None:
        if isinstance(msg, ipc.Submit):
            self._submit(link, msg)
        elif isinstance(msg, ipc.Cancel):
            key = link.keys.get(msg.rid)
            if key is not None:
                self.engine.cancel(key)
        elif isinstance(msg, ipc.Report):
            if msg.sent_gaps:  # a report holds a quarter second's gaps: recorded at once, idle or not
                self.engine.metrics.gaps("itl_sent", msg.sent_gaps, time.monotonic())
            for code in msg.errors:
                self.engine.count_error(code)
            if msg.loop_lag:
                lags = sorted(msg.loop_lag)
                link.report = {"live": msg.live, "loop_lag_p99_ms": round(lags[int(0.99 * (len(lags) - 1))] * 1e3, 3),
                               "loop_lag_max_ms": round(lags[-1] * 1e3, 3), "at": time.monotonic()}
        elif isinstance(msg, ipc.StatsQuery):
            link.replies.append(ipc.StatsReply(msg.nonce, self._stats(msg)))
            link.kick()
        elif isinstance(msg, ipc.Hello):
            link.frontend, link.pid = msg.frontend, msg.pid
            log.info("frontend_joined", frontend=msg.frontend, pid=msg.pid, link=link.number)

    def _submit(self, link: Link, m: ipc.Submit) -> None:
        if m.rid in link.keys:  # a front end that reuses a live number has lost track: cut it off
            raise ValueError(f"request {m.rid} is live already")
        key = f"f{link.number}/{m.rid}"  # unique for the core's life: link numbers never repeat
        try:
            params = SamplingParams(m.max_tokens, m.temperature, m.top_k, m.top_p, m.seed, (), m.ignore_eos, m.logprobs,
                                    m.grammar)
            self.engine.accept(key, m.prompt, params, RemoteOutbox(link, m.rid), None, m.label, m.priority, m.client)
        except RequestError as exc:
            link.finished.append(ipc.Finished(m.rid, "error", len(m.prompt), 0, None, None, 0.0, None,
                                              exc.code, exc.message))
            self.engine.count_error(exc.code)
            link.kick()
            return
        link.keys[m.rid] = key

    def _stats(self, query: ipc.StatsQuery) -> bytes:
        if query.metrics:
            return self.engine.prometheus_text()
        snap = self.engine.snapshot(hdr=query.hdr)
        snap["processes"] = self.processes()
        return self._encoder.encode(snap)

    def processes(self) -> dict:
        """The core and each front end: pid, and how late each one's event loop wakes tasks."""
        lag = self.engine.metrics.snapshot()["window"]["loop_lag"]
        now = time.monotonic()
        frontends = []
        for link in sorted(self.links.values(), key=lambda x: x.frontend or 0):
            r = link.report
            frontends.append({"frontend": link.frontend, "pid": link.pid, "live": r.get("live"),
                              "loop_lag_p99_ms": r.get("loop_lag_p99_ms"), "loop_lag_max_ms": r.get("loop_lag_max_ms"),
                              "report_age_s": round(now - r["at"], 3) if r else None})
        return {"core": {"pid": os.getpid(), "loop_lag_p99_ms": lag["p99_ms"], "loop_lag_max_ms": lag["max_ms"]},
                "frontends": frontends}


async def serve_core(engine: Engine, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept front ends on the Unix socket `path` until cancelled; reports the CoreServer as started."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):  # left by this core's predecessor, killed (the supervisor restarts a core)
        os.unlink(path)
    await sock.bind(path)
    sock.listen(128)
    core = CoreServer(engine)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, core.handle, [trio.SocketListener(sock)])
        task_status.started(core)
