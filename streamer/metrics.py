"""Latency and load metrics, measured at the source: the step loop reports, web handlers read.

Prometheus series (prometheus-client) for scraping, and HDR histograms (hdrhistogram) for live
P50/P95/P99 since start and over a sliding window. Only the step-loop task records; readers run
on the same trio thread, so no locks are needed (the engine's loop watcher records `loop_lag` on
that thread too).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter as Tally
from collections import deque
from dataclasses import dataclass

import numpy as np
from hdrh.histogram import HdrHistogram
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily

# Log-spaced from 1 ms to 60 s, about 12 buckets a decade: P99 readable at millisecond resolution.
LATENCY_BUCKETS = tuple(round(0.001 * 10 ** (i / 12), 6) for i in range(0, 12 * 4 + 10)) + (float("inf"),)
SERIES = ("ttft", "itl", "itl_sent", "e2e", "queue", "loop_lag")
MAX_US = 3_600_000_000  # one hour in microseconds


def _hdr() -> HdrHistogram:
    """Two significant digits: a percentile within 1% of the value it reports. /stats merges and
    walks 12 of these on the event loop while every stream's next token waits; three digits would
    make each ~23k buckets instead of ~3.3k, and the walk about seven times longer."""
    return HdrHistogram(1, MAX_US, 2)


@dataclass(frozen=True)
class StepRecord:
    """What one engine step did."""

    t_end: float
    seconds: float  # the device's time for the step (CUDA events; on the CPU the host's clock)
    idle_gap: float  # time the device sat idle before this step while work was pending
    prefill_tokens: int
    decode_tokens: int
    generated: int  # tokens sampled and sent
    running: int
    waiting: int
    kv_used: int
    kv_free: int

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


class Window:
    """HDR histograms in time slices; the window is the merge of the slices still young enough."""

    def __init__(self, seconds: float = 60.0, slices: int = 6) -> None:
        self.slice_s = seconds / slices
        self.slices: deque[tuple[float, dict[str, HdrHistogram]]] = deque(maxlen=slices)

    def record(self, series: str, seconds: float, now: float, count: int = 1) -> None:
        start = now - now % self.slice_s
        if not self.slices or self.slices[-1][0] != start:
            self.slices.append((start, {s: _hdr() for s in SERIES}))
        self.slices[-1][1][series].record_value(max(1, min(MAX_US, int(seconds * 1e6))), count)

    def merged(self, series: str, now: float) -> HdrHistogram:
        out = _hdr()
        for start, hists in self.slices:
            if start > now - self.slice_s * self.slices.maxlen:
                out.add(hists[series])
        return out


def values_at_percentiles(h: HdrHistogram, pcts: tuple[float, ...]) -> list[int]:
    """`h.get_value_at_percentile(p)` for each p > 0 of `pcts`, from one cumulative sum of the
    counts: the library walks every bucket in Python for each call, and /stats asks for 30
    percentiles on the event loop, where every stream's next token waits for it."""
    cum = np.cumsum(np.ctypeslib.as_array(h.counts)[:h.counts_len])
    targets = [h.get_target_count_at_percentile(p) for p in pcts]
    return [h.get_highest_equivalent_value(h.get_value_from_index(min(int(i), h.counts_len - 1)))
            for i in np.searchsorted(cum, targets)]  # the first bucket whose running count reaches it


def percentiles(h: HdrHistogram) -> dict[str, float | int]:
    if h.get_total_count() == 0:
        return {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    ms = lambda v: round(v / 1000, 3)  # noqa: E731
    p50, p95, p99 = values_at_percentiles(h, (50, 95, 99))
    return {"count": h.get_total_count(), "p50_ms": ms(p50), "p95_ms": ms(p95), "p99_ms": ms(p99),
            "max_ms": ms(h.get_max_value())}


class LatencyHistogram:
    """A Prometheus histogram observed once per token, so it must be cheap: a bisect and a list
    increment, exported through prometheus-client's collector interface at scrape time."""

    def __init__(self, name: str, doc: str, registry: CollectorRegistry) -> None:
        self.name, self.doc = name, doc
        self.bounds = list(LATENCY_BUCKETS[:-1])
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        registry.register(self)

    def observe(self, seconds: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += count
        self.sum += seconds * count

    def collect(self):
        cumulative, buckets = 0, []
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family = HistogramMetricFamily(self.name, self.doc)
        family.add_metric([], buckets, self.sum)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, window_s: float = 60.0) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        hist = lambda name, doc: LatencyHistogram(name, doc, r)  # noqa: E731
        self.prom = {
            "ttft": hist("streamer_time_to_first_token_seconds", "Arrival to first token"),
            "itl": hist("streamer_inter_token_latency_seconds", "Gap between consecutive tokens of a request"),
            "itl_sent": hist("streamer_sent_inter_token_latency_seconds",
                             "Gap between consecutive token frames of a stream as its door sent them (websocket)"),
            "e2e": hist("streamer_request_latency_seconds", "Arrival to finish"),
            "queue": hist("streamer_queue_time_seconds", "Arrival to first scheduled"),
            "loop_lag": hist("streamer_event_loop_lag_seconds",
                             "How late the event loop wakes a task that slept (sampled every 10 ms)"),
        }
        self.requests = Counter("streamer_requests", "Finished requests", ["finish_reason"], registry=r)
        self.errors = Counter("streamer_errors", "Errors by code", ["code"], registry=r)
        self.tokens = Counter("streamer_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("streamer_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.preemptions = Counter("streamer_preemptions", "Requests preempted (KV swapped out or freed)", registry=r)
        self.prefix_hits = Counter("streamer_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                   registry=r)
        self._prefix_hits_seen = 0
        self.recomputed = Counter("streamer_recomputed_tokens", "Tokens computed again after a preemption freed their KV",
                                  registry=r)
        self._recomputed_seen = 0
        self.swap_counters = (  # fed from the scheduler's running totals, in this order
            Counter("streamer_swap_outs", "Preempted requests whose KV was swapped to host memory", registry=r),
            Counter("streamer_swap_ins", "Swapped-out requests resumed from host memory", registry=r),
            Counter("streamer_swapped_out_blocks", "KV blocks copied to the host swap pool", registry=r),
            Counter("streamer_swapped_in_blocks", "KV blocks copied back from the host swap pool", registry=r),
        )
        self._swaps_seen = (0, 0, 0, 0)
        self.running = Gauge("streamer_running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("streamer_waiting_requests", "Requests waiting for admission", registry=r)
        self.kv_used = Gauge("streamer_kv_used_blocks", "KV blocks in use", registry=r)
        self.kv_free = Gauge("streamer_kv_free_blocks", "KV blocks free", registry=r)
        self.batch_tokens = Gauge("streamer_batch_tokens", "Tokens in the last step", registry=r)
        self.step_budget = Gauge("streamer_step_token_budget", "Token budget of a step, now", registry=r)
        self.running_cap = Gauge("streamer_running_cap", "Most requests running at once, now "
                                 "(--max-running when uncapped)", registry=r)
        self.step_seconds = Histogram("streamer_step_seconds", "Device time of a model step (CUDA events; the "
                                      "host's clock on the CPU)", buckets=LATENCY_BUCKETS, registry=r)
        self.device_idle = Counter("streamer_device_idle_seconds", "Time the device sat idle between two steps "
                                   "while requests were live (waiting for the host)", registry=r)
        self.decode_tokens = Gauge("streamer_decode_tokens", "Decode tokens in the last step (the rest were prefill)",
                                   registry=r)
        self.t_start = time.monotonic()
        self.total = {s: _hdr() for s in SERIES}
        self.window = Window(window_s)
        self.steps: deque[StepRecord] = deque(maxlen=512)
        self.generated = 0
        self.finished = 0

    def watch_live(self, running, waiting, kv_used, kv_free) -> None:
        """Running and waiting requests and KV blocks, as functions the gauges read when scraped:
        set at each step instead, they kept the last busy step's values on an idle server."""
        for gauge, fn in ((self.running, running), (self.waiting, waiting), (self.kv_used, kv_used),
                          (self.kv_free, kv_free)):
            gauge.set_function(fn)

    def watch_knobs(self, budget, running_cap) -> None:
        """The two batching knobs, as functions the gauges read when scraped."""
        self.step_budget.set_function(budget)
        self.running_cap.set_function(running_cap)

    def observe(self, series: str, seconds: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.prom[series].observe(seconds)
        self.total[series].record_value(max(1, min(MAX_US, int(seconds * 1e6))))
        self.window.record(series, seconds, now)

    def emitted(self, count: int, gaps: list[float], now: float) -> None:
        """`count` tokens were emitted at `now`; `gaps`: each one's time since its request's previous
        token (first tokens have none)."""
        self.generated += count
        self.gaps("itl", gaps, now)

    def gaps(self, series: str, gaps: list[float], now: float) -> None:
        """Record many samples of `series`. Gaps of one step are mostly equal: each distinct value
        is recorded once, with its count."""
        for gap, n in Tally(gaps).items():
            self.prom[series].observe(gap, n)
            self.total[series].record_value(max(1, min(MAX_US, int(gap * 1e6))), n)
            self.window.record(series, gap, now, n)

    def finished_request(self, reason: str, prompt_tokens: int, error_code: str | None = None) -> None:
        self.finished += 1
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        if error_code:
            self.error(error_code)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def step(self, rec: StepRecord, preempted: int, prefix_hit_tokens: int = 0, recomputed_tokens: int = 0,
             swaps: tuple[int, int, int, int] = (0, 0, 0, 0)) -> None:
        """`prefix_hit_tokens`, `recomputed_tokens` and `swaps` (swap-outs, swap-ins, blocks out,
        blocks in) are the scheduler's running totals."""
        self.steps.append(rec)
        for counter, now, seen in zip(self.swap_counters, swaps, self._swaps_seen, strict=True):
            counter.inc(now - seen)
        self._swaps_seen = swaps
        self.prefix_hits.inc(prefix_hit_tokens - self._prefix_hits_seen)
        self._prefix_hits_seen = prefix_hit_tokens
        self.recomputed.inc(recomputed_tokens - self._recomputed_seen)
        self._recomputed_seen = recomputed_tokens
        self.tokens.inc(rec.generated)
        self.step_seconds.observe(rec.seconds)
        self.device_idle.inc(rec.idle_gap)
        self.decode_tokens.set(rec.decode_tokens)
        self.preemptions.inc(preempted)
        self.batch_tokens.set(rec.tokens)

    def snapshot(self, now: float | None = None) -> dict:
        """Live figures for /stats and the dashboard."""
        now = time.monotonic() if now is None else now
        recent = [s for s in self.steps if s.t_end > now - 10]
        span = (now - recent[0].t_end + recent[0].seconds) if recent else 0.0
        last = self.steps[-1] if self.steps else None
        return {
            "uptime_s": round(now - self.t_start, 3),
            "window_s": self.window.slice_s * self.window.slices.maxlen,
            "window": {s: percentiles(self.window.merged(s, now)) for s in SERIES},
            "since_start": {s: percentiles(self.total[s]) for s in SERIES},
            "throughput_tok_s": round(sum(s.generated for s in recent) / span, 2) if span else 0.0,
            "tokens_generated": self.generated,
            "requests_finished": self.finished,
            "running": last.running if last else 0,
            "waiting": last.waiting if last else 0,
            "kv_used_blocks": last.kv_used if last else 0,
            "kv_free_blocks": last.kv_free if last else None,
            "batch_tokens": last.tokens if last else 0,
            "step_ms": round(last.seconds * 1000, 3) if last else None,
            "decode_tokens": last.decode_tokens if last else 0,
            # share of the last 10 s of steps the device sat idle between them, waiting for the host
            "device_idle": round(sum(s.idle_gap for s in recent) / span, 4) if span else 0.0,
        }
