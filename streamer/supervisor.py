"""`streamer serve` as several processes: one engine core (or one per data-parallel replica) and
N front ends, started, watched and stopped by this one.

The supervisor binds the listening socket itself (so a busy port fails at once) and hands it to
every front end, which all accept from it. It starts the cores, waits for their ready lines, then
the front ends, each of which dials every core. A front end that dies is started again (the cores
cancel its requests, so their KV comes back). A core that dies takes its own requests with it
(`unavailable`); with several cores it is started again while the others serve, and with one the
server exits 1. SIGTERM or Ctrl-C drains the front ends, then stops the cores, and exits 0; a
second signal hurries the drain. A child whose supervisor died stops by itself (`watch_parent`),
so none is orphaned.
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

    def __init__(self, name: str, argv: list[str], pass_fds: tuple[int, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.pass_fds = pass_fds
        self.env = env  # set over the supervisor's own environment
        self.process: trio.Process | None = None
        self.started_at = 0.0

    async def start(self) -> trio.lowlevel.FdStream:
        """Start the process; the returned stream yields its ready line."""
        rfd, wfd = os.pipe()
        self.started_at = time.monotonic()
        try:
            self.process = await trio.lowlevel.open_process(
                [*self.argv, "--ready-fd", str(wfd), "--parent-pid", str(os.getpid())],
                pass_fds=(*self.pass_fds, wfd), start_new_session=True,
                env={**os.environ, **self.env} if self.env else None)
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
    def __init__(self, child_argv: list[str], frontends: int, host: str, port: int, model: str,
                 core_env: list[dict[str, str]] | None = None) -> None:
        self.child_argv = child_argv
        self.frontends = frontends
        self.core_env = core_env or [{}]  # one per core: how many there are, and each one's GPU
        self.host, self.port, self.model = host, port, model
        self.stop = trio.Event()  # set by a signal, the core's death, or a front end that keeps dying
        self.status = 0

    async def run(self) -> int:
        listener = bind_listener(self.host, self.port)  # OSError (port in use) before anything starts
        tmp = Path(tempfile.mkdtemp(prefix="streamer-"))
        try:
            return await self._run(listener, [str(tmp / f"core-{i}.sock") for i in range(len(self.core_env))])
        finally:
            listener.close()
            shutil.rmtree(tmp, ignore_errors=True)

    async def _run(self, listener: socket.socket, ipc_paths: list[str]) -> int:
        url = _page_url(listener.getsockname(), self.host)
        cores = [Child("core" if len(ipc_paths) == 1 else f"core-{i}",
                       [*self.child_argv, "--role", "core", "--ipc", path], env=self.core_env[i])
                 for i, path in enumerate(ipc_paths)]
        fes = [Child(f"frontend-{i}", [*self.child_argv, "--role", "frontend", "--ipc", ",".join(ipc_paths),
                                       "--listen-fd", str(listener.fileno()), "--frontend-id", str(i)],
                     (listener.fileno(),))
               for i in range(1, self.frontends + 1)]
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._on_signals, signals, fes)
                with trio.CancelScope() as starting:
                    nursery.start_soon(_cancel_when, self.stop, starting)
                    if await self._start_cores(cores):
                        for core in cores:
                            nursery.start_soon(self._keep, core, len(cores) > 1)
                        async with trio.open_nursery() as group:
                            for fe in fes:
                                group.start_soon(self._start, fe)
                        if sys.stdout.isatty():
                            print(f"Streamer ready: open {url}", flush=True)
                        else:
                            log.info(f"Streamer ready: open {url}", url=url, model=self.model, frontends=len(fes),
                                     cores=len(cores))
                        for fe in fes:
                            nursery.start_soon(self._keep, fe, True)
                await self.stop.wait()
                await self._shut_down(cores, fes)
                nursery.cancel_scope.cancel()
        return self.status

    async def _start_cores(self, cores: list[Child]) -> bool:
        """Start every core at once and wait for all; False (the server stops) if one fails."""
        failed: list[int] = []

        async def one(core: Child) -> None:
            code = await self._start(core)
            if code is not None:
                failed.append(code or 1)

        async with trio.open_nursery() as nursery:
            for core in cores:
                nursery.start_soon(one, core)
        if failed:
            self.status = failed[0]
            self.stop.set()
        return not failed

    async def _shut_down(self, cores: list[Child], fes: list[Child]) -> None:
        """Front ends first (each drains its streams), then the cores; SIGKILL for what hangs."""
        for fe in fes:
            fe.signal(signal.SIGTERM)
        for fe in fes:
            if fe.process is not None:
                await fe.process.wait()
        for core in cores:
            core.signal(signal.SIGTERM)
        for core in cores:
            if core.process is None:
                continue
            with trio.move_on_after(CORE_STOP_S):
                await core.process.wait()
                continue
            log.error("core_did_not_stop", process=core.name, pid=core.process.pid)
            core.signal(signal.SIGKILL)
            await core.process.wait()

    async def _start(self, child: Child) -> int | None:
        """Start a child and wait for its ready line; its exit status if it died first, else None."""
        if await child.ready(await child.start()):
            return None
        code = await child.process.wait()
        log.error("failed_to_start", process=child.name, status=code)
        return code

    async def _keep(self, child: Child, restart: bool) -> None:
        """Start a child again whenever it dies, unless the server is stopping; one that is not
        restarted (the only core), or keeps dying, stops the server with status 1."""
        failures = 0
        while not self.stop.is_set():
            code = await child.process.wait()
            if self.stop.is_set():
                return
            lived = time.monotonic() - child.started_at
            failures = failures + 1 if lived < RESTART_WINDOW_S else 1
            what = "core" if child.name.startswith("core") else "frontend"
            log.error(f"{what}_died", process=child.name, status=code, lived_s=round(lived, 3),
                      restarts=failures if restart else None)
            if not restart or failures > RESTART_LIMIT:
                if restart:
                    log.error(f"{what}_keeps_dying", process=child.name)
                self.status = 1
                self.stop.set()
                return
            await self._start(child)

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

