"""Command line: `python -m streamer serve --model smollm2 --port 8000`.

The composition root: parses flags into an EngineConfig, configures logging once, opens the engine
and serves the web app from one nursery. The only module of streamer/ that may import web/.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import signal
import sys
from functools import partial

import structlog
import trio

from streamer.config import KV_DTYPES, EngineConfig
from streamer.logging import LEVELS, configure_logging
from streamer.router import POLICIES
from streamer.supervisor import (
    Supervisor,
    bind_listener,
    child_argv,
    default_frontends,
    raise_fd_limit,
    watch_parent,
)
from streamer.types import RequestError
from web.config import WebConfig

# Errors that mean "this configuration cannot start" (bad model name, missing file, port in use):
# before the server is ready they get one line and exit status 2, never a traceback.
STARTUP_ERRORS = (ValueError, RequestError, OSError)


class StartupError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    parser = argparse.ArgumentParser(prog="python -m streamer", description="Streamer LLM inference server")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the chat page and the /v1/stream websocket",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--model", default=defaults["model"],
                       help="'smollm2', a local Hugging Face model folder, or 'random:NAME'")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000, help="0 picks a free port")
    serve.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                       help="default: float32 on CPU, bfloat16 on CUDA")
    serve.add_argument("--device", default=None, help="'cpu', 'cuda' or 'cuda:N'; default: cuda if available")
    serve.add_argument("--attention", choices=("torch", "cuda"), default=None,
                       help="attention backend; default: cuda on CUDA, torch on CPU")
    serve.add_argument("--kv-memory", type=float, default=defaults["kv_memory"],
                       help="KV arena size: GiB if > 1, else a fraction of free device memory")
    serve.add_argument("--kv-blocks", type=int, default=None,
                       help="exact number of KV blocks; overrides --kv-memory")
    serve.add_argument("--kv-dtype", choices=KV_DTYPES, default=defaults["kv_dtype"],
                       help="KV cache storage: auto (the model's dtype), int8 or int4 (lossy, opt-in: see "
                            "docs/BENCHMARKS.md)")
    serve.add_argument("--block-size", type=int, default=defaults["block_size"], help="tokens per KV block")
    serve.add_argument("--max-batch-tokens", type=int, default=None,
                       help="token budget of one step (always wins over auto-tuning; with objectives, the "
                            "controller's ceiling); default: auto-tuned, else 512")
    serve.add_argument("--auto-tune", action=argparse.BooleanOptionalAction, default=None,
                       help="at warm-up, time a few step budgets and keep the smallest within 90%% of the best "
                            "tokens/s; default: on for CUDA, off on the CPU")
    serve.add_argument("--slo-ttft-ms", type=float, default=None,
                       help="P99 time-to-first-token objective; the controller adapts budget and admission")
    serve.add_argument("--slo-itl-ms", type=float, default=None,
                       help="P99 inter-token latency objective; the controller adapts budget and admission")
    serve.add_argument("--max-running", type=int, default=defaults["max_running"],
                       help="most sequences in one step; default: as many as the KV arena holds at a "
                            "1k-token context, 8 to 256")
    serve.add_argument("--max-waiting", type=int, default=defaults["max_waiting"],
                       help="queued requests beyond which new ones are refused as overloaded")
    serve.add_argument("--seed", type=int, default=defaults["seed"], help="seed of random:NAME weights")
    serve.add_argument("--policy", default=defaults["policy"],
                       help="admission policy: 'fcfs', or a comma-separated set of priority, first-token, "
                            "length, fair (e.g. 'priority,first-token')")
    serve.add_argument("--prefill-share", type=float, default=defaults["prefill_share"],
                       help="first-token policy: share of each step's token budget kept for pending prefills")
    serve.add_argument("--aging-s", type=float, default=defaults["aging_s"],
                       help="priority policy: seconds of waiting that raise a request by one class "
                            "(length policy: waiting this long lifts the length penalty)")
    serve.add_argument("--preemption", choices=("swap", "recompute"), default=None,
                       help="how a request preempted for memory resumes: its KV swapped to host memory and "
                            "back (measured 10-100x cheaper on an H100; the default on CUDA), or "
                            "recomputed (the default elsewhere)")
    serve.add_argument("--swap-space", type=float, default=defaults["swap_space"],
                       help="GiB of host memory (pinned on CUDA) for swapped-out KV blocks (--preemption swap)")
    serve.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=defaults["prefix_caching"],
                       help="reuse the KV blocks of prompt prefixes seen before")
    serve.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=defaults["cuda_graphs"],
                       help="replay decode steps as CUDA graphs (CUDA only)")
    serve.add_argument("--mixed-graphs", action=argparse.BooleanOptionalAction, default=defaults["mixed_graphs"],
                       help="run steps with prefill as CUDA graph pieces between the attention launches, "
                            "bucketed by token count (CUDA only; steps over 8192 tokens run eagerly)")
    serve.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=defaults["overlap"],
                       help="plan and launch the next step while the device runs this one (default: on for CUDA)")
    serve.add_argument("--tensor-parallel-size", type=int, default=defaults["tensor_parallel_size"],
                       help="split the model over this many processes (torch.distributed; gloo on the CPU "
                            "only so far; steps run without overlap)")
    serve.add_argument("--data-parallel-size", type=int, default=1,
                       help="engine cores, each with its own GPU (CUDA) and its own copy of the model, behind "
                            "every front end's router")
    serve.add_argument("--share-gpus", action="store_true",
                       help="with --data-parallel-size: allow more cores than GPUs (core i on GPU i mod count; "
                            "give --kv-memory in GiB per core)")
    serve.add_argument("--router", choices=POLICIES, default="cache-aware",
                       help="with --data-parallel-size: send each request to the core holding the longest "
                            "prefix of it while the cores' loads are in balance, else the least loaded "
                            "(cache-aware); or to each core in turn (round-robin)")
    serve.add_argument("--log-level", choices=LEVELS, default="info")
    serve.add_argument("--frontends", type=int, default=None,
                       help="front-end processes (websockets, HTTP, tokenizing) beside the engine core's "
                            "process; 0 runs everything in one process; default: one per four cores, 1 to 8")
    # Set by the supervisor for its children; not for users.
    serve.add_argument("--role", choices=("core", "frontend"), default=None, help=argparse.SUPPRESS)
    serve.add_argument("--ipc", default=None, help=argparse.SUPPRESS)
    serve.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--frontend-id", type=int, default=0, help=argparse.SUPPRESS)
    _add_web_flags(serve)
    return parser


def _add_web_flags(serve: argparse.ArgumentParser) -> None:
    web = WebConfig()
    edge = serve.add_argument_group("limits and access (the web edge)")
    # Not shown by --help's defaults, so a key from the environment never lands in a terminal.
    edge.add_argument("--api-key", default=None,
                      help="bearer token required by the API and websockets; else $STREAMER_API_KEY if set")
    edge.add_argument("--allowed-origins", type=_origins, default=web.allowed_origins,
                      help="comma-separated websocket Origins allowed besides the server's own; '*' for any")
    edge.add_argument("--max-live-per-connection", type=int, default=web.max_live_per_connection,
                      help="live generations one websocket may hold")
    edge.add_argument("--max-prompt-tokens", type=int, default=web.max_prompt_tokens,
                      help="longest prompt in tokens; none: the context and KV arena bound it")
    edge.add_argument("--max-tokens", type=int, default=web.max_tokens,
                      help="largest max_tokens a request may ask; none: only the context bounds it")
    edge.add_argument("--max-frame-bytes", type=int, default=web.max_frame_bytes,
                      help="largest websocket message (closes 1009) and HTTP body (413)")
    edge.add_argument("--ws-ping-interval", type=float, default=web.ping_interval,
                      help="seconds between websocket pings; 0 turns them off")
    edge.add_argument("--ws-idle-timeout", type=float, default=web.idle_timeout,
                      help="close a websocket silent this many seconds with nothing live (4408); 0: never")
    edge.add_argument("--drain-timeout", type=float, default=web.drain_timeout,
                      help="on SIGTERM, seconds live generations get to finish before they are cut")


def _origins(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


def web_config_from_args(args: argparse.Namespace) -> WebConfig:
    return WebConfig(
        api_key=args.api_key or os.environ.get("STREAMER_API_KEY") or None, allowed_origins=args.allowed_origins,
        max_live_per_connection=args.max_live_per_connection, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens, max_frame_bytes=args.max_frame_bytes,
        ping_interval=args.ws_ping_interval or None, idle_timeout=args.ws_idle_timeout or None,
        drain_timeout=args.drain_timeout,
    )


def core_environments(cores: int, device: str | None, share: bool = False,
                      kv_memory: float = 1.0) -> list[dict[str, str]]:
    """Each data-parallel core's environment: on CUDA, `CUDA_VISIBLE_DEVICES` naming its own GPU
    (the i-th of those visible here), so every core runs on its `cuda:0`. With `share`, more cores
    than GPUs: core i on GPU i mod count, each arena `kv_memory` GiB (a fraction of free memory
    would be measured by cores starting together on one GPU, each seeing it all free)."""
    if cores == 1:
        return [{}]
    if device is not None and device not in ("cpu", "cuda"):
        raise ValueError(f"--data-parallel-size gives each core a GPU of its own: use --device cuda, not {device}")
    if device == "cpu":
        return [{} for _ in range(cores)]
    import torch  # the supervisor's only use of it: how many GPUs there are

    count = torch.cuda.device_count()
    if count == 0:
        if device == "cuda":
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        return [{} for _ in range(cores)]
    if count < cores and not share:
        raise ValueError(f"--data-parallel-size {cores} needs {cores} GPUs, one a core; {count} visible "
                         f"(--share-gpus puts several cores on one)")
    if count < cores and kv_memory <= 1:
        raise ValueError("--share-gpus needs --kv-memory in GiB (> 1) for each core's KV arena")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",")][:count] if visible else [str(i) for i in range(count)]
    return [{"CUDA_VISIBLE_DEVICES": names[i % count]} for i in range(cores)]


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    # Every config field has a flag of the same name; a field added without one keeps its default.
    names = [f.name for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)]
    return EngineConfig(**{name: getattr(args, name) for name in names})


class Shutdown:
    """Signals, as events: `requested` by the first SIGTERM/SIGINT, `hurry` by the second."""

    def __init__(self) -> None:
        self.requested = trio.Event()
        self.hurry = trio.Event()
        self.serving = False  # before this, a signal cancels start-up at once


async def run_server(config: EngineConfig, host: str, port: int, web: WebConfig | None = None) -> None:
    # Imported here: importing the engine loads torch, and the web layer is ours to compose only.
    from streamer.engine import open_engine
    from web.lifecycle import Lifecycle, drain
    from web.server import serve

    web = web or WebConfig()
    log = structlog.get_logger("streamer")
    ready = False
    shutdown = Shutdown()
    try:
        async with trio.open_nursery() as root:
            # Watch signals from the start, so Ctrl-C while the model loads also shuts down cleanly.
            await root.start(_watch_signals, shutdown, root.cancel_scope, log)
            # Bound before the model loads, so a busy port fails at once; hypercorn owns the socket.
            fd = bind_listener(host, port).detach()
            async with open_engine(config) as engine, trio.open_nursery() as nursery:
                lifecycle = Lifecycle()
                binds = await nursery.start(partial(serve, engine, host, port, config=web, lifecycle=lifecycle,
                                                    fd=fd))
                # The model, tokenizer and web app are loaded for good: move them out of the cyclic
                # collector's reach, so its full collections (pauses every request's next token
                # waits out) scan only what serving allocates.
                gc.collect()
                gc.freeze()
                ready = shutdown.serving = True
                url = _page_url(binds[0] if binds else f"http://{host}:{port}")
                if sys.stdout.isatty():
                    print(f"Streamer ready: open {url}", flush=True)
                else:  # keep stdout pure JSON lines for log collectors
                    log.info(f"Streamer ready: open {url}", url=url, model=engine.model_name)
                await shutdown.requested.wait()
                # Drain: refuse new work, let live generations finish (or cut them), close sockets.
                await drain(engine, lifecycle, web.drain_timeout, shutdown.hurry)
                nursery.cancel_scope.cancel()
            root.cancel_scope.cancel()  # the server stopped on its own: stop watching signals
    except* STARTUP_ERRORS as group:
        if ready:
            raise
        raise StartupError(_first_message(group)) from None


async def _startup_guarded(body, shutdown: Shutdown) -> None:
    """Run `body`; a STARTUP_ERRORS before the process is serving becomes one StartupError line."""
    try:
        await body()
    except* STARTUP_ERRORS as group:
        if shutdown.serving:
            raise
        raise StartupError(_first_message(group)) from None


def _say_ready(fd: int | None) -> None:
    """Tell the supervisor this child is serving (one line on its ready pipe)."""
    if fd is not None:
        os.write(fd, b"ready\n")
        os.close(fd)


async def run_core(config: EngineConfig, ipc_path: str, ready_fd: int | None, drain_timeout: float,
                   parent: int | None) -> None:
    """The engine core process: the engine and the socket front ends reach it on; nothing else."""
    from streamer.core import serve_core
    from streamer.engine import open_engine

    log = structlog.get_logger("streamer")
    shutdown = Shutdown()

    async def body() -> None:
        async with trio.open_nursery() as root:
            await root.start(_watch_signals, shutdown, root.cancel_scope, log)
            root.start_soon(_watch_supervisor, parent, shutdown, root.cancel_scope)
            async with open_engine(config) as engine, trio.open_nursery() as nursery:
                await nursery.start(serve_core, engine, ipc_path)
                gc.collect()
                gc.freeze()
                shutdown.serving = True
                _say_ready(ready_fd)
                await shutdown.requested.wait()
                # The supervisor stops the core after its front ends: normally nothing is live.
                engine.stop_accepting()
                with trio.move_on_after(drain_timeout):
                    await engine.wait_drained()
                nursery.cancel_scope.cancel()
            root.cancel_scope.cancel()

    await _startup_guarded(body, shutdown)


async def run_frontend(config: EngineConfig, web: WebConfig, args: argparse.Namespace) -> None:
    """A front-end process: the web app on the supervisor's listening socket, over an EngineClient."""
    from gpu.models import load_tokenizer
    from streamer.client import EngineClient
    from streamer.router import RoutePolicy, Router
    from web.lifecycle import Lifecycle, drain
    from web.server import serve

    log = structlog.get_logger("streamer")
    shutdown = Shutdown()

    async def body() -> None:
        async with trio.open_nursery() as root:
            await root.start(_watch_signals, shutdown, root.cancel_scope, log)
            root.start_soon(_watch_supervisor, args.parent_pid, shutdown, root.cancel_scope)
            tokenizer = await trio.to_thread.run_sync(load_tokenizer, config.model)
            clients = [EngineClient(path, tokenizer, args.frontend_id, config.max_buffered_events)
                       for path in args.ipc.split(",")]
            client = clients[0] if len(clients) == 1 else Router(clients, RoutePolicy(args.router))
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                lifecycle = Lifecycle()
                await nursery.start(partial(serve, client, config=web, lifecycle=lifecycle, fd=args.listen_fd))
                gc.collect()
                gc.freeze()
                shutdown.serving = True
                _say_ready(args.ready_fd)
                await shutdown.requested.wait()
                await drain(client, lifecycle, web.drain_timeout, shutdown.hurry)
                nursery.cancel_scope.cancel()
            root.cancel_scope.cancel()

    await _startup_guarded(body, shutdown)


async def _watch_supervisor(parent: int | None, shutdown: Shutdown, scope: trio.CancelScope) -> None:
    """A child whose supervisor died stops as if sent SIGTERM (before serving: at once)."""
    if parent is None:
        return

    def gone() -> None:
        if shutdown.serving:
            shutdown.requested.set()
        else:
            scope.cancel()

    await watch_parent(parent, gone)


async def _watch_signals(shutdown: Shutdown, scope: trio.CancelScope, log, *,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    # The first signal drains (or, while loading, cancels); the second cuts the drain short; once
    # this receiver closes, a third interrupts hard.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if not shutdown.serving:
                log.info("shutting_down", signal=name)
                scope.cancel()
                return
            if not shutdown.requested.is_set():
                log.info("shutting_down", signal=name)
                shutdown.requested.set()
            else:
                log.info("shutting_down_now", signal=name)
                shutdown.hurry.set()
                return


def _page_url(bind: str) -> str:
    # A wildcard bind is not an address a browser can open; point at this machine instead.
    for wildcard, local in (("//0.0.0.0:", "//127.0.0.1:"), ("//[::]:", "//[::1]:")):
        bind = bind.replace(wildcard, local)
    return bind.rstrip("/") + "/"


def _first_message(group: BaseExceptionGroup) -> str:
    exc = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, RequestError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror and not exc.filename:  # e.g. "address already in use"
        return f"cannot start: {exc.strerror}"
    return str(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage line on a bad flag
    try:
        config = config_from_args(args)
        web = web_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    frontends = default_frontends() if args.frontends is None else args.frontends
    if frontends < 0:
        parser.error("--frontends must be >= 0")
    if args.data_parallel_size < 1:
        parser.error("--data-parallel-size must be >= 1")
    if args.data_parallel_size > 1 and frontends == 0:
        parser.error("--data-parallel-size needs front-end processes: --frontends 0 runs one engine in one process")
    configure_logging(args.log_level)
    raise_fd_limit()  # every websocket is a file descriptor; 1024 is a common soft limit
    status = 0
    try:
        if args.role == "core":
            # The front ends need cores of their own: torch's CPU threads spinning on every core
            # starve them (docs/BENCHMARKS.md, "Online against offline").
            import torch

            torch.set_num_threads(max(1, ((os.cpu_count() or 1) - frontends) // args.data_parallel_size))
            trio.run(run_core, config, args.ipc, args.ready_fd, web.drain_timeout + 5, args.parent_pid)
        elif args.role == "frontend":
            trio.run(run_frontend, config, web, args)
        elif frontends == 0:
            trio.run(run_server, config, args.host, args.port, web)
        else:
            try:
                core_env = core_environments(args.data_parallel_size, config.device, args.share_gpus,
                                             config.kv_memory)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
            supervisor = Supervisor(child_argv(sys.argv[1:] if argv is None else argv), frontends, args.host,
                                    args.port, config.model, core_env)
            try:
                status = trio.run(supervisor.run)
            except OSError as exc:  # the port: taken, or not ours to bind
                raise StartupError(f"cannot start: {exc.strerror or exc}") from None
    except* KeyboardInterrupt:  # a Ctrl-C during loading, or a second one during shutdown
        status = 130
    except* StartupError as group:
        print(f"streamer: error: {group.exceptions[0]}", file=sys.stderr)
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
