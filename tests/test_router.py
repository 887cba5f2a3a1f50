"""The data-parallel router's parts that are plain Python: block hashes, the prefix index, the
routing rule, and merging the cores' /stats and /metrics into one answer."""

from __future__ import annotations

import pytest
from hdrh.histogram import HdrHistogram
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamer import ipc
from streamer.router import PrefixIndex, RoutePolicy, Router, block_hashes, merge_metrics, merge_stats
from streamer.types import RequestError, SamplingParams


def test_block_hashes_chain_full_blocks_only():
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # the last 8 tokens fill no block
    assert block_hashes(list(range(32)) + [99] * 16, 16)[:2] == a
    # the same block after a different prefix hashes differently
    assert block_hashes([7] * 16 + list(range(16, 32)), 16)[1] != a[1]


def test_prefix_index_matches_leading_blocks_and_forgets_the_least_recent():
    index = PrefixIndex(capacity=4)
    first, other = block_hashes(list(range(48)), 16), block_hashes(list(range(100, 148)), 16)
    index.insert(first)
    assert index.match(first) == 3
    assert index.match(first[:1] + other[1:]) == 1
    assert index.match(other) == 0
    index.insert(other)  # 6 blocks into 4: the first two of `first` go
    assert len(index) == 4 and index.match(first) == 0 and index.match(other) == 3


def test_balanced_loads_follow_the_longest_prefix():
    rule = RoutePolicy()
    assert rule.pick({0: 3, 1: 5}, {0: 0, 1: 8}, blocks=10, turn=0) == (1, "prefix")


def test_a_short_match_goes_to_the_least_loaded_core():
    rule = RoutePolicy()
    assert rule.pick({0: 3, 1: 5}, {0: 0, 1: 4}, blocks=10, turn=0) == (0, "load")


def test_out_of_balance_the_least_loaded_core_wins_even_against_a_full_match():
    rule = RoutePolicy(balance_abs=32, balance_rel=1.5)
    assert rule.pick({0: 10, 1: 50}, {1: 10}, blocks=10, turn=0) == (0, "balance")
    # past the absolute threshold but not the relative one: still balanced
    assert rule.pick({0: 100, 1: 140}, {1: 10}, blocks=10, turn=0) == (1, "prefix")


def test_ties_rotate_and_round_robin_ignores_everything():
    rule = RoutePolicy()
    assert [rule.pick({0: 0, 1: 0, 2: 0}, {}, blocks=0, turn=t)[0] for t in range(4)] == [0, 1, 2, 0]
    rr = RoutePolicy("round-robin")
    assert [rr.pick({0: 9, 2: 0}, {2: 5}, blocks=5, turn=t)[0] for t in range(3)] == [0, 2, 0]
    with pytest.raises(ValueError, match="router must be one of"):
        RoutePolicy("random")


def _snapshot(finished: int, running: int, used: int, total: int, ttft_ms: list[float]) -> dict:
    h = HdrHistogram(1, 3_600_000_000, 2)
    for ms in ttft_ms:
        h.record_value(int(ms * 1000))
    lat = {"count": len(ttft_ms), "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": max(ttft_ms), "max_ms": max(ttft_ms)}
    return {
        "model": "m", "uptime_s": 10.0, "tokens_generated": 10 * finished, "requests_finished": finished,
        "running": running, "waiting": 0, "kv_used_blocks": used, "kv_free_blocks": total - used, "steps": 5,
        "preemptions": 0, "recomputed_tokens": 0, "throughput_tok_s": 100.0, "batch_tokens": 4, "decode_tokens": 4,
        "device_idle": 0.1, "batching": {"max_batch_tokens": 512},
        "kv": {"total_blocks": total, "used_blocks": used, "free_blocks": total - used, "usage": used / total},
        "swap": {"swaps_out": 1, "swaps_in": 0},
        "recent_steps": {"window_s": 1.0, "steps": 2, "batch_tokens_mean": 3.0, "batch_tokens_max": 4,
                         "prefill_tokens": 0, "decode_tokens": 6, "device_s": 0.5, "device_idle_s": 0.1},
        "window": {"ttft": lat, "itl": lat}, "since_start": {"ttft": lat, "itl": lat},
        "hdr": {"ttft": h.encode().decode("ascii"), "itl": h.encode().decode("ascii")},
        "processes": {"core": {"pid": 100 + finished}, "frontends": [{"frontend": 1}]},
    }


def test_merged_stats_add_up_and_keep_each_core():
    merged = merge_stats([_snapshot(3, 1, 10, 100, [5.0, 6.0]), None, _snapshot(5, 2, 30, 100, [50.0])])
    assert merged["requests_finished"] == 8 and merged["running"] == 3 and merged["throughput_tok_s"] == 200.0
    assert merged["kv"] == {"total_blocks": 200, "used_blocks": 40, "free_blocks": 160, "usage": 0.2}
    assert merged["swap"] == {"swaps_out": 2, "swaps_in": 0}
    assert merged["recent_steps"]["steps"] == 4 and merged["recent_steps"]["device_s"] == 0.5
    assert merged["window"]["ttft"]["p99_ms"] == 50.0 and merged["window"]["ttft"]["count"] == 3
    assert merged["since_start"]["ttft"]["count"] == 3  # from the merged HDR histograms
    assert HdrHistogram.decode(merged["hdr"]["ttft"]).get_total_count() == 3
    assert [c["up"] for c in merged["cores"]] == [True, False, True]
    assert [c["requests_finished"] for c in merged["cores"] if c["up"]] == [3, 5]
    assert [c["core"] for c in merged["processes"]["cores"]] == [0, 2]


def _exposition(requests: int, running: int) -> bytes:
    r = CollectorRegistry()
    Counter("streamer_requests", "Finished requests", ["finish_reason"], registry=r).labels("stop").inc(requests)
    Gauge("streamer_running_requests", "Requests in the running batch", registry=r).set(running)
    return generate_latest(r)


def test_merged_metrics_label_every_sample_with_its_core():
    text = merge_metrics([_exposition(3, 1), None, _exposition(5, 2)]).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.count("# TYPE streamer_requests_total counter") == 1
    assert "streamer_requests_created" not in families
    samples = {(s.name, s.labels["core"]): s.value for f in families.values() for s in f.samples}
    assert samples == {("streamer_requests_total", "0"): 3.0, ("streamer_requests_total", "2"): 5.0,
                       ("streamer_running_requests", "0"): 1.0, ("streamer_running_requests", "2"): 2.0}


class FakeCore:
    """An EngineClient as the router sees it: connected or not, its live count, its Welcome."""

    def __init__(self, pid: int) -> None:
        self.tokenizer = None
        self.connected = True
        self.live_requests = 0
        self.on_finish = None
        self.welcome = ipc.Welcome("m", 2048, 2047, "context", 100, 64, 16, pid)
        self.prompts: list[list[int]] = []

    def submit(self, ids, params, request_id=None, priority=0, client=""):
        self.prompts.append(ids)
        self.live_requests += 1
        return len(self.prompts)


def test_the_router_keeps_a_conversation_on_its_core_and_skips_a_dead_one():
    a, b = FakeCore(1), FakeCore(2)
    router = Router([a, b])
    params = SamplingParams(max_tokens=4)
    turn1 = list(range(100))
    router.submit(turn1, params)
    router.submit(list(range(500, 600)), params)  # another conversation: the other, idler core
    assert (len(a.prompts), len(b.prompts)) == (1, 1)
    a.on_finish(turn1, list(range(1000, 1040)))  # the answer's blocks are on core 0 now too
    router.submit(turn1 + list(range(1000, 1040)) + list(range(2000, 2030)), params)
    assert len(a.prompts) == 2 and router.reasons["prefix"] == 1
    a.connected = False
    router.submit(turn1 + [7] * 50, params)
    assert len(b.prompts) == 2
    b.connected = False
    with pytest.raises(RequestError, match="not available"):
        router.submit(turn1, params)


def test_a_restarted_core_starts_with_an_empty_index():
    a, b = FakeCore(1), FakeCore(2)
    router = Router([a, b])
    prompt = list(range(100))
    router.submit(prompt, SamplingParams(max_tokens=4))
    assert router.indexes[0].match(block_hashes(prompt, 16)) == 6
    a.welcome = ipc.Welcome("m", 2048, 2047, "context", 100, 64, 16, 99)  # a new process on that socket
    a.live_requests = b.live_requests = 0
    router.submit(prompt, SamplingParams(max_tokens=4))
    assert router.reasons["prefix"] == 0 and len(router.indexes[0]) + len(router.indexes[1]) == 6
