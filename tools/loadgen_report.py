"""Numbers and pictures for tools/loadgen.py: client- and server-side percentiles (HDR histograms),
goodput, the side-by-side table, and PNG plots of latency percentiles against offered load.

Run as a script it plots a saved run, or a sweep: several configurations' P99s against output tok/s,
one line each, from a summary JSON such as docs/figures/controller_sweep.json.

    python tools/loadgen_report.py OUT/loadgen.json [OUT/loadgen.png]
    python tools/loadgen_report.py docs/figures/controller_sweep.json docs/figures/controller_sweep.png
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

SERIES = ("ttft", "itl", "e2e", "queue")
MAX_US = 3_600_000_000
CLIENT_CPU_WARN = 0.8  # a client process busier than this share of a core may be what limits the run


def hdr() -> HdrHistogram:
    return HdrHistogram(1, MAX_US, 3)


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds on the client's monotonic clock."""

    t_send: float
    prompt_tokens_target: int
    token_times: list[float] = field(default_factory=list)
    t_done: float | None = None
    priority: int = 0  # the request's class (--priorities)
    done: dict | None = None  # the server's done frame
    error: str | None = None  # an error code, or "timeout"
    conn: str | None = None  # the client's address:port of the connection that carried it

    @property
    def ok(self) -> bool:
        return self.done is not None and self.error is None and self.done["finish_reason"] in ("stop", "length")


def pct(h: HdrHistogram) -> dict:
    if h.get_total_count() == 0:
        return {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    ms = lambda v: round(v / 1000, 2)  # noqa: E731
    return {"count": h.get_total_count(), **{f"p{p}_ms": ms(h.get_value_at_percentile(p)) for p in (50, 95, 99)},
            "max_ms": ms(h.get_max_value())}


def _us(seconds: float) -> int:
    return max(1, min(MAX_US, int(seconds * 1e6)))


def client_side(outcomes: list[Outcome]) -> dict:
    """Percentiles as the client measured them: from sending `generate` to each frame's arrival.
    Queue time only the server can see: it comes from each done frame's timing."""
    hs = {s: hdr() for s in SERIES}
    for o in outcomes:
        if not o.token_times:
            continue
        hs["ttft"].record_value(_us(o.token_times[0] - o.t_send))
        for a, b in zip(o.token_times, o.token_times[1:], strict=False):
            hs["itl"].record_value(_us(b - a))
        if o.ok:
            hs["e2e"].record_value(_us(o.t_done - o.t_send))
            if o.done["timing"].get("queue_ms") is not None:
                hs["queue"].record_value(_us(o.done["timing"]["queue_ms"] / 1000))
    return {s: pct(hs[s]) for s in SERIES}


def server_side(before: dict, after: dict) -> dict:
    """Exact server percentiles of one run: the since-start HDR histograms of /stats?hdr=1 taken
    after the run, minus those taken before it."""
    out = {}
    for s in SERIES:
        a = HdrHistogram.decode(after["hdr"][s].encode("ascii"))  # base64 of compressed counts
        b = HdrHistogram.decode(before["hdr"][s].encode("ascii"))
        diff = hdr()
        for it in a.get_recorded_iterator():
            n = it.count_at_value_iterated_to - b.get_count_at_value(it.value_iterated_to)
            if n > 0:
                diff.record_value(it.value_iterated_to, n)
        out[s] = pct(diff)
    return out


def goodput(outcomes: list[Outcome], slo_ttft_ms: float, slo_itl_ms: float) -> float:
    """Share of all requests sent that finished with TTFT <= the TTFT SLO and mean inter-token
    time (TPOT) <= the ITL SLO, both as the client saw them (the definition of vLLM's benchmark)."""
    good = 0
    for o in outcomes:
        if not o.ok or not o.token_times:
            continue
        ttft = (o.token_times[0] - o.t_send) * 1000
        n = len(o.token_times)
        tpot = (o.token_times[-1] - o.token_times[0]) * 1000 / (n - 1) if n > 1 else 0.0
        good += ttft <= slo_ttft_ms and tpot <= slo_itl_ms
    return round(good / len(outcomes), 4) if outcomes else 0.0


def table(result: dict) -> str:
    """Client and server percentiles side by side, in milliseconds, under a line saying how the
    client loaded the server (and a warning when a client process was near a full core)."""
    lines = []
    if result.get("client_processes"):  # runs saved before they were recorded have none
        procs = result["client_processes"]
        cpu = ", ".join(f"{p['cpu_share']:.0%}" for p in procs)
        lines.append(f"client: {result['transport']} ({result['connections']} connections), {len(procs)} "
                     f"process{'es' if len(procs) > 1 else ''}, CPU {cpu} of a core")
        for p in procs:
            if p["cpu_share"] > CLIENT_CPU_WARN:
                lines.append(f"WARNING: client process {p['worker']} used {p['cpu_share']:.0%} of a core: the client "
                             "may be the bottleneck (more --processes, or CPUs of its own)")
    lines.append(f"{'':6} {'':6} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}   {'count':>6}")
    fmt = lambda v: f"{v:8.1f}" if v is not None else f"{'-':>8}"  # noqa: E731
    for s in SERIES:
        for side in ("client", "server"):
            p = result[side][s] if result.get(side) else None
            if p is None:
                continue
            row = " ".join(fmt(p[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
            lines.append(f"{s:6} {side:6} {row}   {p['count']:>6}")
    return "\n".join(lines)


def plot(results: list[dict], path: str, x_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["load"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    for ax, s in zip(axes, ("ttft", "itl", "e2e"), strict=True):
        for side, style in (("client", "-"), ("server", "--")):
            for p, colour in (("p50_ms", "tab:blue"), ("p95_ms", "tab:orange"), ("p99_ms", "tab:red")):
                ys = [r[side][s][p] if r.get(side) else None for r in results]
                if any(y is not None for y in ys):
                    ax.plot(xs, [float("nan") if y is None else y for y in ys], style, color=colour, marker="o",
                            label=f"{p[:3].upper()} {side}")
        ax.set_title({"ttft": "time to first token", "itl": "inter-token latency", "e2e": "end to end"}[s])
        ax.set_xlabel(x_label)
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(data: dict, path: str) -> None:
    """A sweep summary: `configs` maps a configuration's name to rows of [offered req/s, output tok/s,
    TTFT p99 client ms, TTFT p99 server ms, ITL p99 client ms, ...]; `objectives` lists the
    (TTFT, ITL) ms pairs drawn as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    for name, rows in data["configs"].items():
        tok = [r[1] for r in rows]
        for ax, col in zip(axes, (2, 4), strict=True):
            ax.plot(tok, [r[col] for r in rows], marker="o", label=name)
            for r in rows:
                ax.annotate(f"{r[0]:g}/s", (r[1], r[col]), fontsize=6, alpha=0.6)
    titles = ("P99 time to first token (client)", "P99 inter-token latency (client)")
    for i, (ax, title) in enumerate(zip(axes, titles, strict=True)):
        ax.set_title(title)
        ax.set_xlabel("output tok/s")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        for pair in data.get("objectives", []):
            ax.axhline(pair[i], color="grey", linestyle=":", linewidth=1)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="a run's loadgen.json, or a sweep summary (a JSON object with `configs`)")
    ap.add_argument("dst", nargs="?", help="the PNG to write; default: SRC with .png for .json")
    args = ap.parse_args()
    data = json.loads(open(args.src).read())
    target = args.dst or args.src.removesuffix(".json") + ".png"
    if "configs" in data:
        plot_sweep(data, target)
    else:
        x_label = "offered rate (req/s)" if data["results"][0]["mode"] == "open" else "clients"
        plot(data["results"], target, x_label)
        for r in data["results"]:
            print(table(r))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
