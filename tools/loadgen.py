"""Load generator: real websocket clients on loopback against a running server's /v1/stream.

Open-loop Poisson arrivals at each --rates value, or closed-loop --concurrency; prompts shaped
like gpu/workload.json (text of about each request's prompt length) or read from a file of chat
prompts. Prints client- and server-side percentiles side by side; writes JSON and a PNG plot.

    python -m streamer serve --model random:tiny-qwen3 --port 8123 &
    python tools/loadgen.py --url http://127.0.0.1:8123 --rates 1,2 --num-requests 30
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

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


def text_of_length(n_tokens: int, tokens_per_word: float, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(n_tokens / tokens_per_word))))


async def tokens_per_word(ws_url: str) -> float:
    """The protocol takes text, and the server's tokenizer is not ours to load: one probe request
    (max_tokens 1) reports how many tokens our words make, via its done frame's usage."""
    words = 200
    async with open_websocket_url(ws_url) as ws:
        prompt = text_of_length(words, 1.0, random.Random(1))
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


class Connection:
    """One websocket carrying many generations; a reader task routes frames to their Outcome."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.pending: dict[str, tuple[report.Outcome, trio.Event]] = {}

    async def read(self) -> None:
        async for message in _messages(self.ws):
            now = time.monotonic()
            data = json.loads(message)
            for frame in data if isinstance(data, list) else (data,):  # ?batch=1: arrays of frames
                self._route(frame, now)

    def _route(self, frame: dict, now: float) -> None:
        entry = self.pending.get(frame.get("id"))
        if entry is None:
            return
        outcome, event = entry
        if frame["type"] == "token":
            outcome.token_times.append(now)
        elif frame["type"] == "error":
            outcome.error = frame["code"]
            if not outcome.token_times:  # refused before starting: no done frame follows
                self._end(frame["id"], now)
        elif frame["type"] == "done":
            outcome.done = frame
            self._end(frame["id"], now)

    def _end(self, rid: str, now: float) -> None:
        outcome, event = self.pending.pop(rid)
        outcome.t_done = now
        event.set()

    async def request(self, rid: str, body: dict, outcomes: list) -> None:
        frame = {"type": "generate", "id": rid, **{k: v for k, v in body.items() if not k.startswith("_")}}
        outcome = report.Outcome(time.monotonic(), body["_target"], priority=body.get("priority", 0))
        outcomes.append(outcome)
        event = trio.Event()
        self.pending[rid] = (outcome, event)
        await self.ws.send_message(json.dumps(frame))
        await event.wait()


async def _messages(ws):
    from trio_websocket import ConnectionClosed

    while True:
        try:
            yield await ws.get_message()
        except ConnectionClosed:
            return


def get_stats(http: str) -> dict:
    with urllib.request.urlopen(f"{http}/stats?hdr=1", timeout=10) as r:
        return json.loads(r.read())


async def wait_idle(http: str, limit_s: float = 30.0) -> dict:
    """The server's stats once nothing runs or waits (so every request's e2e is recorded)."""
    with trio.move_on_after(limit_s):
        while True:
            stats = await trio.to_thread.run_sync(get_stats, http)
            if stats["running"] == 0 and stats["waiting"] == 0:
                return stats
            await trio.sleep(0.1)
    return await trio.to_thread.run_sync(get_stats, http)


async def progress(label: str, total: int, outcomes: list, t0: float) -> None:
    """A bar redrawn in place on a terminal; a line every 5 s otherwise (logs, CI)."""
    tty = sys.stderr.isatty()
    while True:
        done = sum(o.t_done is not None for o in outcomes)
        errors = sum(o.error is not None for o in outcomes)
        bar = "#" * (30 * done // max(1, total))
        print(f"{label:>14} [{bar:<30}] {done}/{total} done, {len(outcomes) - done} in flight, "
              f"{errors} errors, {time.monotonic() - t0:5.1f} s", end="\r" if tty else "\n", file=sys.stderr,
              flush=True)
        await trio.sleep(0.25 if tty else 5.0)


async def run_one(args, prompts: list[dict], rate: float | None, concurrency: int | None) -> dict:
    """One load level: open loop at `rate` req/s, or closed loop with `concurrency` clients."""
    ws_url = args.url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/stream"
    if args.batch:
        ws_url += "?batch=1"
    before = await wait_idle(args.url)
    outcomes: list[report.Outcome] = []
    label = f"{rate:g} req/s" if rate else f"{concurrency} clients"
    ids = (f"r{i}" for i in itertools.count())
    n = min(args.num_requests, len(prompts))
    t0, t0_trio = time.monotonic(), trio.current_time()  # trio's clock has its own origin
    async with trio.open_nursery() as outer:
        outer.start_soon(progress, label, n, outcomes, t0)
        conns = []
        for _ in range(args.connections if rate else concurrency):
            ws = await outer.start(_open, ws_url)
            conn = Connection(ws)
            outer.start_soon(conn.read)
            conns.append(conn)
        # Sending stops at --duration; stragglers get --drain more seconds, then count as timeouts.
        with trio.move_on_after(args.duration + args.drain):
            async with trio.open_nursery() as nursery:
                if rate:
                    rng, t = random.Random(args.seed), 0.0
                    for i in range(n):
                        t += rng.expovariate(rate)
                        if t > args.duration:
                            break
                        await trio.sleep_until(t0_trio + t)
                        nursery.start_soon(conns[i % len(conns)].request, next(ids), prompts[i], outcomes)
                else:
                    queue = iter(range(n))

                    async def client(conn: Connection) -> None:
                        for i in queue:
                            if time.monotonic() - t0 > args.duration:
                                return
                            await conn.request(next(ids), prompts[i], outcomes)

                    for conn in conns:
                        nursery.start_soon(client, conn)
        outer.cancel_scope.cancel()  # closes the sockets: the server cancels what is left
    if sys.stderr.isatty():
        print(file=sys.stderr)
    wall = time.monotonic() - t0
    for o in outcomes:
        if o.t_done is None:
            o.error = "timeout"
    after = await wait_idle(args.url)
    ok = [o for o in outcomes if o.ok]
    sends = sorted(o.t_send for o in outcomes)
    prompt_tokens = [o.done["usage"]["prompt_tokens"] for o in ok]
    return {
        "load": rate or concurrency, "mode": "open" if rate else "closed", "sent": len(outcomes),
        "completed": len(ok), "wall_s": round(wall, 2),
        "arrival_rate": round((len(outcomes) - 1) / (sends[-1] - sends[0]), 3) if len(sends) > 1 else None,
        "output_tok_s": round(sum(len(o.token_times) for o in outcomes) / wall, 1) if wall else 0.0,
        "mean_prompt_tokens": round(sum(prompt_tokens) / len(prompt_tokens), 1) if prompt_tokens else None,
        "goodput": report.goodput(outcomes, args.slo_ttft_ms, args.slo_itl_ms),
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "client": report.client_side(outcomes), "server": report.server_side(before, after),
        "by_priority": {str(p): report.client_side([o for o in outcomes if o.priority == p])
                        for p in sorted({o.priority for o in outcomes})} if len({o.priority for o in outcomes}) > 1 else {},
    }


async def _open(url: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    # Large queue: the reader drains it at once; backpressure here would distort the timings.
    async with open_websocket_url(url, message_queue_size=4096) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--connections", type=int, default=8, help="websockets shared by open-loop requests")
    p.add_argument("--priorities", help="comma-separated request classes, cycled over the requests "
                   "(e.g. 0,0,0,5: a quarter at class 5); per-class percentiles are printed")
    p.add_argument("--batch", action="store_true",
                   help="open /v1/stream?batch=1: the server sends the frames ready together in one message")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0)
    p.add_argument("--slo-itl-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=7, help="seed of the arrival times")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="first run the first level's load this many seconds, unmeasured (prompts of its own)")
    p.add_argument("--out", type=Path, default=ROOT / "artifacts" / "loadgen", help="JSON and PNG go here")
    args = p.parse_args(argv)
    if not args.rates and not args.concurrency:
        args.rates = ",".join(str(r) for r in load_spec(args.workload)["online"]["rates_per_s"])
    return args


async def main(args) -> list[dict]:
    if args.prompts:  # the file's prompts, the same at every level (so prefix-cache hits carry over)
        prompts = file_prompts(args.prompts, args.max_tokens)
        prompts = list(itertools.islice(itertools.cycle(prompts), args.num_requests))
    else:
        ws_url = args.url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/stream"
        tpw = await tokens_per_word(ws_url)
        print(f"calibration: {tpw:.2f} tokens per word on this server's tokenizer", file=sys.stderr)

    def level_prompts(level: int) -> list[dict]:
        """Level 0 is the warm-up; each level has texts of its own (the same lengths)."""
        out = prompts if args.prompts else workload_prompts(args.workload, args.num_requests, args.cap_prompt,
                                                            args.cap_output, tpw, text_seed=level)
        if args.priorities:  # request i gets the i-th class, cycling (the server's --policy priority uses it)
            classes = [int(p) for p in args.priorities.split(",")]
            out = [{**body, "priority": classes[i % len(classes)]} for i, body in enumerate(out)]
        return out

    levels = [(float(r), None) for r in args.rates.split(",")] if args.rates else \
             [(None, int(c)) for c in args.concurrency.split(",")]
    if args.warmup > 0:  # the first level's load, unmeasured: a fresh server pays for first calls
        warm = argparse.Namespace(**{**vars(args), "duration": args.warmup, "drain": min(args.drain, 30.0)})
        result = await run_one(warm, level_prompts(0), *levels[0])
        print(f"== warm-up at the first level's load for {args.warmup:g} s: {result['completed']}/{result['sent']} "
              f"completed, {result['output_tok_s']} output tok/s (not reported)")
    results = []
    for level, (rate, concurrency) in enumerate(levels, start=1):
        result = await run_one(args, level_prompts(level), rate, concurrency)
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
    return results


if __name__ == "__main__":
    args = parse_args()
    results = trio.run(main, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loadgen.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=1))
    print(f"\nwrote {args.out / 'loadgen.json'}")
    try:
        report.plot(results, str(args.out / "loadgen.png"), "offered rate (req/s)" if args.rates else "clients")
        print(f"wrote {args.out / 'loadgen.png'}")
    except ImportError:  # e.g. a GPU box without matplotlib: plot elsewhere from the JSON
        print(f"no matplotlib here: plot later with `python tools/loadgen_report.py {args.out / 'loadgen.json'}`")
