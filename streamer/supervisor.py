"""`streamer serve` as several processes: one engine core and N front ends, started, watched and
stopped by this one.

The supervisor binds the listening socket itself (so a busy port fails at once) and hands it to
every front end, which all accept from it. It starts the core, waits for its ready line, then the
front ends. A front end that dies is started again (the core cancels its requests, so their KV
comes back); if the core dies the front ends answer `unavailable` and the server exits 1. SIGTERM
or Ctrl-C drains the front ends, then stops the core, and exits 0; a second signal hurries the
drain. A child whose supervisor died stops by itself (`watch_parent`), so none is orphaned.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import structlog
import trio

log = structlog.get_logger("streamer.supervisor")
READY = b"ready\n"
CORE_STOP_S = 10.0  # after the front ends are gone, how long the core gets to exit on SIGTERM
RESTART_WINDOW_S = 10.0  # a front end that dies this soon after its start, again and again...
PARENT_POLL_S = 0.5  # how often a child checks that its supervisor lives
RESTART_LIMIT = 5  # ...this many times in a row, takes the server down instead of restarting forever


def default_frontends() -> int:
    """One front end per four cores, at least one and at most eight."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


async def watch_parent(parent: int, on_gone) -> None:
    """In a child: call `on_gone()` once the supervisor has died (the child is re-parented).
    (PR_SET_PDEATHSIG would not do: it fires when the *thread* that started the child exits, and
    trio starts processes from worker threads that come and go.)"""
    while os.getppid() == parent:
        await trio.sleep(PARENT_POLL_S)
    log.error("supervisor_gone", parent=parent)
    on_gone()


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (every websocket is one);
    returns the limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def bind_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Child:
    """One child process and its ready pipe."""

    def __init__(self, name: str, argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        self.name = name
        self.argv = argv
        self.pass_fds = pass_fds
        self.process: trio.Process | None = None
        self.started_at = 0.0

    async def start(self) -> trio.lowlevel.FdStream:
        """Start the process; the returned stream yields its ready line."""
        rfd, wfd = os.pipe()
        self.started_at = time.monotonic()
        try:
            self.process = await trio.lowlevel.open_process(
                [*self.argv, "--ready-fd", str(wfd), "--parent-pid", str(os.getpid())],
                pass_fds=(*self.pass_fds, wfd), start_new_session=True)
        finally:
            os.close(wfd)
        log.info("process_started", process=self.name, pid=self.process.pid)
        return trio.lowlevel.FdStream(rfd)

    async def ready(self, pipe: trio.lowlevel.FdStream) -> bool:
        """True once it says ready; False if it exited (or closed the pipe) first."""
        async with pipe:
            data = b""
            while READY not in data:
                chunk = await pipe.receive_some(64)
                if not chunk:
                    return False
                data += chunk
        return True

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.returncode is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass


class Supervisor:
    def __init__(self, child_argv: list[str], frontends: int, host: str, port: int, model: str) -> None:
        self.child_argv = child_argv
        self.frontends = frontends
        self.host, self.port, self.model = host, port, model
        self.stop = trio.Event()  # set by a signal, the core's death, or a front end that keeps dying
        self.status = 0

    async def run(self) -> int:
        listener = bind_listener(self.host, self.port)  # OSError (port in use) before anything starts
        tmp = Path(tempfile.mkdtemp(prefix="streamer-"))
        try:
            return await self._run(listener, str(tmp / "core.sock"))
        finally:
            listener.close()
            shutil.rmtree(tmp, ignore_errors=True)

    async def _run(self, listener: socket.socket, ipc_path: str) -> int:
        url = _page_url(listener.getsockname(), self.host)
        core = Child("core", [*self.child_argv, "--role", "core", "--ipc", ipc_path])
        fes = [Child(f"frontend-{i}", [*self.child_argv, "--role", "frontend", "--ipc", ipc_path,
                                       "--listen-fd", str(listener.fileno()), "--frontend-id", str(i)],
                     (listener.fileno(),))
               for i in range(1, self.frontends + 1)]
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_signals, signals, fes)
                with trio.CancelScope() as starting:
                    nursery.start_soon(_cancel_when, self.stop, starting)
                    if not await core.ready(await core.start()):
                        code = await core.process.wait()
                        log.error("core_failed_to_start", status=code)
                        self.status = code or 1
                        self.stop.set()
                    else:
                        nursery.start_soon(self._watch_core, core)
                        async with trio.open_nursery() as group:
                            for fe in fes:
                                group.start_soon(self._start_frontend, fe)
                        if sys.stdout.isatty():
                            print(f"Streamer ready: open {url}", flush=True)
                        else:
                            log.info(f"Streamer ready: open {url}", url=url, model=self.model, frontends=len(fes))
                        for fe in fes:
                            nursery.start_soon(self._keep_frontend, fe)
                await self.stop.wait()
                await self._shut_down(core, fes)
                nursery.cancel_scope.cancel()
        return self.status

    async def _shut_down(self, core: Child, fes: list[Child]) -> None:
        """Front ends first (each drains its streams), then the core; SIGKILL for what hangs."""
        for fe in fes:
            fe.signal(signal.SIGTERM)
        for fe in fes:
            if fe.process is not None:
                await fe.process.wait()
        if core.process is None:
            return
        core.signal(signal.SIGTERM)
        with trio.move_on_after(CORE_STOP_S):
            await core.process.wait()
            return
        log.error("core_did_not_stop", pid=core.process.pid)
        core.signal(signal.SIGKILL)
        await core.process.wait()

    async def _start_frontend(self, fe: Child) -> None:
        if not await fe.ready(await fe.start()):
            log.error("frontend_failed_to_start", process=fe.name, status=await fe.process.wait())

    async def _keep_frontend(self, fe: Child) -> None:
        """Start a front end again whenever it dies, unless the server is stopping."""
        failures = 0
        while not self.stop.is_set():
            code = await fe.process.wait()
            if self.stop.is_set():
                return
            lived = time.monotonic() - fe.started_at
            failures = failures + 1 if lived < RESTART_WINDOW_S else 1
            log.error("frontend_died", process=fe.name, status=code, lived_s=round(lived, 3), restarts=failures)
            if failures > RESTART_LIMIT:
                log.error("frontend_keeps_dying", process=fe.name)
                self.status = 1
                self.stop.set()
                return
            await self._start_frontend(fe)

    async def _watch_core(self, core: Child) -> None:
        code = await core.process.wait()
        if not self.stop.is_set():
            log.error("core_died", status=code)
            self.status = 1
            self.stop.set()

    async def _on_signals(self, signals, fes: list[Child]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not self.stop.is_set():
                log.info("shutting_down", signal=name)
                self.stop.set()
            else:
                log.info("shutting_down_now", signal=name)
                for fe in fes:
                    fe.signal(signal.SIGTERM)  # a front end's second signal cuts its drain short


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _page_url(sockname, host: str) -> str:
    port = sockname[1]
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host.strip("[]"), host.strip("[]"))
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def child_argv(argv: list[str]) -> list[str]:
    """The command line a child runs: this interpreter, this module, the user's own flags."""
    return [sys.executable, "-m", "streamer", *argv]

