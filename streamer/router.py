"""Data parallelism in a front end: `Router`, the EngineHandle over several engine cores (one
`EngineClient` each), which sends every request to one of them.

The rule is the SGLang router's cache-aware one. While the cores' loads (this front end's live
requests on each) are in balance, a request goes to the core holding the longest prefix of it, if
that covers at least `cache_threshold` of its full blocks; otherwise, and whenever the loads are
out of balance past both thresholds, to the least-loaded core. What each core holds is
approximated by a `PrefixIndex` of the block hashes this front end sent it (prompts, and the
answers once they finish), least recently used first out, no larger than the core's arena.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import trio
from hdrh.histogram import HdrHistogram
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamer.client import UNAVAILABLE, EngineClient
from streamer.metrics import percentiles
from streamer.request import Generation
from streamer.types import RequestError, SamplingParams

POLICIES = ("cache-aware", "round-robin")
CONNECT_GRACE_S = 10.0  # at start, how long to wait for every core before serving on those reached


def block_hashes(ids: Sequence[int], block_size: int) -> list[int]:
    """One hash per full block, each chained onto its prefix's (as the core's prefix cache keys
    blocks; the values differ, being only this process's)."""
    out, h = [], 0
    for start in range(0, len(ids) - block_size + 1, block_size):
        h = hash((h, *ids[start:start + block_size]))
        out.append(h)
    return out


class PrefixIndex:
    """The blocks one core probably holds in its prefix cache, as chained hashes, LRU-bounded."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` it holds."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        blocks = self._blocks
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


@dataclass(frozen=True)
class RoutePolicy:
    """Which core takes a request: plain Python over loads and prefix matches."""

    name: str = "cache-aware"
    balance_abs: int = 32  # out of balance when max - min load exceeds this...
    balance_rel: float = 1.5  # ...and max exceeds this multiple of min
    cache_threshold: float = 0.5  # share of a prompt's full blocks a core must hold to win it

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"router must be one of {', '.join(POLICIES)}, got {self.name!r}")

    def pick(self, loads: dict[int, int], matches: dict[int, int], blocks: int, turn: int) -> tuple[int, str]:
        """(core, why) among the cores in `loads` (those serving); `turn` breaks ties in rotation."""
        order = sorted(loads)
        if self.name == "round-robin":
            return order[turn % len(order)], "rotation"
        least = min(loads.values())
        idlest = [c for c in order if loads[c] == least]
        fallback = idlest[turn % len(idlest)]
        most = max(loads.values())
        if most - least > self.balance_abs and most > self.balance_rel * least:
            return fallback, "balance"
        best = max(matches.get(c, 0) for c in order)
        if best and best >= self.cache_threshold * blocks:
            holders = [c for c in order if matches.get(c, 0) == best]
            return min(holders, key=lambda c: loads[c]), "prefix"
        return fallback, "load"


class Router:
    """The EngineHandle of a front end over several cores; each core's `EngineClient` keeps its
    own live requests, so a core that dies ends only its own (`unavailable`)."""

    def __init__(self, clients: list[EngineClient], policy: RoutePolicy | None = None) -> None:
        assert clients
        self.clients = clients
        self.policy = policy or RoutePolicy()
        self.indexes = [PrefixIndex() for _ in clients]
        self._pids: list[int | None] = [None] * len(clients)  # the core process each index describes
        self.routed = [0] * len(clients)  # requests each core was sent, by this front end
        self.reasons = {"prefix": 0, "load": 0, "balance": 0, "rotation": 0}
        self._turn = 0
        self.tokenizer = clients[0].tokenizer
        if self.policy.name == "cache-aware":
            for i, client in enumerate(clients):
                client.on_finish = lambda prompt, output, i=i: self._learn(i, prompt, output)

    # --- what the doors ask ----------------------------------------------------------------------
    @property
    def _serving(self) -> list[int]:
        return [i for i, c in enumerate(self.clients) if c.connected]

    def _first(self) -> EngineClient:
        up = self._serving
        return self.clients[up[0] if up else 0]

    @property
    def model_name(self) -> str:
        return self._first().model_name

    @property
    def max_context(self) -> int:
        return self._first().max_context

    @property
    def connected(self) -> bool:
        return bool(self._serving)

    @property
    def live_requests(self) -> int:
        return sum(c.live_requests for c in self.clients)

    def encode_prompt(self, text: str) -> list[int]:
        return self._first().encode_prompt(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self._first().encode_chat(messages)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
               priority: int = 0, client: str = "") -> Generation:
        up = self._serving
        if not up:
            raise RequestError("unavailable", UNAVAILABLE)
        ids = list(prompt_ids)
        hashes: list[int] = []
        matches: dict[int, int] = {}
        if self.policy.name == "cache-aware":
            hashes = block_hashes(ids, self.clients[up[0]].welcome.block_size)
            matches = {i: self._index(i).match(hashes) for i in up}
        core, why = self.policy.pick({i: self.clients[i].live_requests for i in up}, matches, len(hashes), self._turn)
        gen = self.clients[core].submit(ids, params, request_id, priority, client)  # may refuse: then nothing changes
        self._turn += 1
        self.routed[core] += 1
        self.reasons[why] += 1
        if hashes:
            self._index(core).insert(hashes)
        return gen

    def _index(self, core: int) -> PrefixIndex:
        """That core's index; emptied when the core is a new process (restarted: its cache is empty)."""
        welcome = self.clients[core].welcome
        if welcome is not None and welcome.pid != self._pids[core]:
            self._pids[core] = welcome.pid
            self.indexes[core] = PrefixIndex(welcome.kv_blocks)
        return self.indexes[core]

    def _learn(self, core: int, prompt: list[int], output: list[int]) -> None:
        """A request finished on `core`: its answer's blocks are in that core's cache now too."""
        welcome = self.clients[core].welcome
        if welcome is not None:
            self._index(core).insert(block_hashes(prompt + output, welcome.block_size))

    def delivered(self, gaps: list[float]) -> None:
        self._first().delivered(gaps)  # the server's figure: which core records it does not matter

    def count_error(self, code: str) -> None:
        self._first().count_error(code)

    async def stats(self, hdr: bool = False) -> dict:
        snaps = await self._gather(lambda c: c.stats(hdr=hdr))
        if not any(snaps):
            raise RequestError("unavailable", UNAVAILABLE)
        merged = merge_stats(snaps)
        merged["router"] = {"policy": self.policy.name, "routed": list(self.routed), **self.reasons}
        return merged

    async def metrics_text(self) -> bytes:
        texts = await self._gather(lambda c: c.metrics_text())
        if not any(texts):
            raise RequestError("unavailable", UNAVAILABLE)
        return merge_metrics(texts)

    async def health(self) -> dict:
        snap = await self.stats()
        kv = snap["kv"]
        return {"model": snap["model"], "max_context": self.max_context,
                "kv": {k: kv[k] for k in ("total_blocks", "free_blocks", "used_blocks")},
                "cores": {"serving": len(self._serving), "total": len(self.clients)}}

    def stop_accepting(self) -> None:
        for c in self.clients:
            c.stop_accepting()

    async def wait_drained(self) -> None:
        for c in self.clients:
            await c.wait_drained()

    def abort_all(self, error: RequestError) -> None:
        for c in self.clients:
            c.abort_all(error)

    async def _gather(self, ask) -> list:
        """`ask(client)` of every serving core at once; None for a core that is down or fails."""
        out: list = [None] * len(self.clients)

        async def one(i: int) -> None:
            try:
                out[i] = await ask(self.clients[i])
            except RequestError:
                pass

        async with trio.open_nursery() as nursery:
            for i in self._serving:
                nursery.start_soon(one, i)
        return out

    # --- the connections --------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep every core's connection; started once all are reached, or after a grace period
        once any is (a core restarting at this front end's start joins when it is back)."""
        async with trio.open_nursery() as nursery:
            for c in self.clients:
                nursery.start_soon(lambda c=c: c.run(persistent=True))
            deadline = time.monotonic() + CONNECT_GRACE_S
            while not all(c.connected for c in self.clients):
                if time.monotonic() > deadline and self.connected:
                    break
                if time.monotonic() > deadline + 3 * CONNECT_GRACE_S:
                    raise OSError(f"no engine core answered at {', '.join(c.path for c in self.clients)}")
                await trio.sleep(0.02)
            task_status.started()


# --- one answer from several cores ---------------------------------------------------------------
_SUMMED = ("tokens_generated", "requests_finished", "running", "waiting", "kv_used_blocks", "kv_free_blocks",
           "steps", "preemptions", "recomputed_tokens", "throughput_tok_s", "batch_tokens", "decode_tokens")


def merge_stats(snaps: list[dict | None]) -> dict:
    """One /stats for the server from each core's (None: that core is down). Counts and rates
    add up; latency percentiles are exact since start when the cores sent their HDR histograms,
    otherwise (and over the window) the slowest core's; `cores` keeps each core's own."""
    ups = [(i, s) for i, s in enumerate(snaps) if s is not None]
    base = ups[0][1]
    out = dict(base)
    for key in _SUMMED:
        values = [s.get(key) for _, s in ups]
        if all(isinstance(v, int | float) for v in values):
            out[key] = round(sum(values), 2) if isinstance(values[0], float) else sum(values)
    out["uptime_s"] = min(s["uptime_s"] for _, s in ups)
    kv = {k: sum(s["kv"][k] for _, s in ups) for k in ("total_blocks", "used_blocks", "free_blocks")}
    kv["usage"] = round(kv["used_blocks"] / kv["total_blocks"], 4) if kv["total_blocks"] else 0.0
    out["kv"] = kv
    out["swap"] = {k: sum(s["swap"][k] for _, s in ups) for k in base["swap"]}
    out["device_idle"] = round(sum(s["device_idle"] for _, s in ups) / len(ups), 4)
    r = [s["recent_steps"] for _, s in ups]
    steps = sum(x["steps"] for x in r)
    out["recent_steps"] = {
        "window_s": r[0]["window_s"], "steps": steps,
        "batch_tokens_mean": round(sum(x["batch_tokens_mean"] * x["steps"] for x in r) / steps, 2) if steps else 0.0,
        "batch_tokens_max": max(x["batch_tokens_max"] for x in r),
        "prefill_tokens": sum(x["prefill_tokens"] for x in r), "decode_tokens": sum(x["decode_tokens"] for x in r),
        # per device, on average: the dashboard's share of time computing and idle
        "device_s": round(sum(x["device_s"] for x in r) / len(r), 6),
        "device_idle_s": round(sum(x["device_idle_s"] for x in r) / len(r), 6),
    }
    out["window"] = {name: _slowest([s["window"][name] for _, s in ups]) for name in base["window"]}
    out["since_start"] = {name: _slowest([s["since_start"][name] for _, s in ups]) for name in base["since_start"]}
    if all("hdr" in s for _, s in ups):
        hdrs = {}
        for name in base["hdr"]:
            h = HdrHistogram.decode(ups[0][1]["hdr"][name])
            for _, s in ups[1:]:
                h.add(HdrHistogram.decode(s["hdr"][name]))
            hdrs[name] = h.encode().decode("ascii")
            out["since_start"][name] = percentiles(h)
        out["hdr"] = hdrs
    procs = [s.get("processes") for _, s in ups]
    if all(procs):
        out["processes"] = {"core": procs[0]["core"], "frontends": procs[0]["frontends"],
                            "cores": [{"core": i, **s["processes"]["core"]} for i, s in ups]}
    out["cores"] = [_core_row(i, s) for i, s in enumerate(snaps)]
    return out


def _slowest(rows: list[dict]) -> dict:
    out = {"count": sum(r["count"] for r in rows)}
    for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = max(values) if values else None
    return out


def _core_row(i: int, s: dict | None) -> dict:
    if s is None:
        return {"core": i, "up": False}
    proc = (s.get("processes") or {}).get("core") or {}
    return {"core": i, "up": True, "pid": proc.get("pid"), "running": s["running"], "waiting": s["waiting"],
            "kv_usage": s["kv"]["usage"], "throughput_tok_s": s["throughput_tok_s"],
            "requests_finished": s["requests_finished"], "tokens_generated": s["tokens_generated"],
            "ttft_p99_ms": s["window"]["ttft"]["p99_ms"], "itl_p99_ms": s["window"]["itl"]["p99_ms"]}


def merge_metrics(texts: list[bytes | None]) -> bytes:
    """One Prometheus exposition from each core's (None: down), every sample labelled with its
    `core`; sum over that label for the server's figures."""
    families: dict[str, object] = {}
    for i, text in enumerate(texts):
        if text is None:
            continue
        for fam in text_string_to_metric_families(text.decode()):
            if fam.name.endswith("_created"):  # the parser splits them off; a scrape needs none
                continue
            for sample in fam.samples:
                sample.labels["core"] = str(i)
            seen = families.setdefault(fam.name, fam)
            if seen is not fam:
                seen.samples.extend(fam.samples)

    class Parsed:
        def collect(self):
            return families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Parsed())
    return generate_latest(registry)

