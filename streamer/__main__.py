"""Command line: `python -m streamer serve --model smollm2 --port 8000`.

The composition root: parses flags into an EngineConfig, configures logging once, opens the engine
and serves the web app from one nursery. The only module of streamer/ that may import web/.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

import structlog
import trio

from streamer.config import EngineConfig
from streamer.logging import LEVELS, configure_logging
from streamer.types import RequestError

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
    serve.add_argument("--block-size", type=int, default=defaults["block_size"], help="tokens per KV block")
    serve.add_argument("--max-batch-tokens", type=int, default=defaults["max_batch_tokens"],
                       help="token budget of one step")
    serve.add_argument("--max-running", type=int, default=defaults["max_running"],
                       help="most sequences in one step")
    serve.add_argument("--max-waiting", type=int, default=defaults["max_waiting"],
                       help="queued requests beyond which new ones are refused as overloaded")
    serve.add_argument("--seed", type=int, default=defaults["seed"], help="seed of random:NAME weights")
    serve.add_argument("--log-level", choices=LEVELS, default="info")
    return parser


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    # Every config field has a flag of the same name; a field added without one keeps its default.
    names = [f.name for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)]
    return EngineConfig(**{name: getattr(args, name) for name in names})


async def run_server(config: EngineConfig, host: str, port: int) -> None:
    # Imported here: importing the engine loads torch, and the web layer is ours to compose only.
    from streamer.engine import open_engine
    from web.server import serve

    log = structlog.get_logger("streamer")
    ready = False
    try:
        async with trio.open_nursery() as root:
            # Watch signals from the start, so Ctrl-C while the model loads also shuts down cleanly.
            await root.start(_cancel_on_signal, root.cancel_scope, log)
            async with open_engine(config) as engine, trio.open_nursery() as nursery:
                binds = await nursery.start(serve, engine, host, port)
                ready = True
                url = _page_url(binds[0] if binds else f"http://{host}:{port}")
                if sys.stdout.isatty():
                    print(f"Streamer ready: open {url}", flush=True)
                else:  # keep stdout pure JSON lines for log collectors
                    log.info(f"Streamer ready: open {url}", url=url, model=engine.model_name)
            root.cancel_scope.cancel()  # the server stopped on its own: stop watching signals
    except* STARTUP_ERRORS as group:
        if ready:
            raise
        raise StartupError(_first_message(group)) from None


async def _cancel_on_signal(scope: trio.CancelScope, log, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    # Only the first Ctrl-C is graceful; once this receiver closes, a second one interrupts hard.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("shutting_down", signal=signal.Signals(signum).name)
            scope.cancel()
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
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(args.log_level)
    status = 0
    try:
        trio.run(run_server, config, args.host, args.port)
    except* KeyboardInterrupt:  # a Ctrl-C during loading, or a second one during shutdown
        status = 130
    except* StartupError as group:
        print(f"streamer: error: {group.exceptions[0]}", file=sys.stderr)
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
