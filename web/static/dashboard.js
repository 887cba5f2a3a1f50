// Dashboard client: one websocket to /v1/stats (a JSON snapshot about once a second) feeding
// seven uPlot charts with the last five minutes, and the number tiles above them. The batching
// knobs (step budget, running cap) and the latency objectives, when set, are drawn too.
"use strict";

const HISTORY = 300;  // points kept per chart (5 minutes at 1 Hz)
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
const BLUE = "#2563eb", AMBER = "#f59e0b", RED = "#dc2626", GREEN = "#16a34a", GREY = "#6b7280", PURPLE = "#7c3aed";

// Each chart: a title and its series, each with a label, colour, a getter from (snap, prev) and
// optionally a dash pattern.
const CHARTS = [
  { title: "Output tokens / s", series: [["tok/s", GREEN, (s, p) => tokPerSecond(s, p)]], fill: true },
  { title: "Time to first token (ms)", series: pct("ttft").concat([objective("slo_ttft_ms")]) },
  { title: "Inter-token latency (ms)", series: pct("itl").concat([
      ["P99 sent", PURPLE, (s) => (s.window.itl_sent ? s.window.itl_sent.p99_ms : null), [2, 3]],
      // how late the event loop woke a 10 ms sleeper: the wait a busy loop adds to every stream
      ["loop lag P99", GREY, (s) => (s.window.loop_lag ? s.window.loop_lag.p99_ms : null), [1, 3]],
      objective("slo_itl_ms")]) },
  { title: "Requests", series: [["running", BLUE, (s) => s.running], ["waiting", AMBER, (s) => s.waiting]] },
  { title: "KV arena used (%)", series: [["KV %", BLUE, (s) => 100 * s.kv.usage]], fill: true, max: 100 },
  { title: "Batch tokens per step, and the step budget", series: [
      ["mean", BLUE, (s) => s.recent_steps.steps ? s.recent_steps.batch_tokens_mean : null],
      ["max", AMBER, (s) => s.recent_steps.steps ? s.recent_steps.batch_tokens_max : null],
      ["budget", GREY, (s) => s.batching.max_batch_tokens, [6, 4]]] },
  { title: "Device: computing, and idle waiting for the host (%)", max: 100, series: [
      ["computing", GREEN, (s) => devicePercent(s, "device_s")],
      ["idle", RED, (s) => devicePercent(s, "device_idle_s")]] },
];

function devicePercent(snap, key) {
  const r = snap.recent_steps;
  return r.steps ? Math.min(100, 100 * r[key] / r.window_s) : null;
}

function pct(name) {
  return [["P50", BLUE, (s) => s.window[name].p50_ms], ["P95", AMBER, (s) => s.window[name].p95_ms],
          ["P99", RED, (s) => s.window[name].p99_ms]];
}

// A latency objective as a dashed line; no line when the server runs without one.
function objective(key) {
  return ["objective", GREY, (s) => (s.batching.controller ? s.batching.controller[key] : null), [6, 4]];
}

function tokPerSecond(snap, prev) {
  if (!prev) return snap.throughput_tok_s;
  const dt = snap.uptime_s - prev.uptime_s;
  return dt > 0 ? (snap.tokens_generated - prev.tokens_generated) / dt : null;
}

const charts = [];
let prev = null, updates = 0;

function makeCharts() {
  const grid = document.getElementById("charts");
  const axis = { stroke: css("--muted"), grid: { stroke: css("--line"), width: 1 },
                 ticks: { stroke: css("--line"), width: 1 } };
  // All boxes first, so the grid has its final columns before any chart reads its width.
  const boxes = CHARTS.map((spec) => {
    const box = document.createElement("div");
    box.className = "chart";
    box.append(document.createElement("h2"));
    box.firstChild.textContent = spec.title;
    grid.append(box);
    return box;
  });
  CHARTS.forEach((spec, k) => {
    const box = boxes[k];
    const opts = {
      width: box.clientWidth - 12, height: 170,
      scales: {
        // A window that scrolls; before the first snapshot, the five minutes up to now.
        x: { time: true, range: (u, lo, hi) => { const end = hi ?? Date.now() / 1000; return [end - HISTORY, end]; } },
        y: { range: (u, lo, hi) => [0, Math.max(spec.max || 1, (hi || 0) * 1.1)] },
      },
      axes: [{ ...axis }, { ...axis, size: 48 }],
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      series: [{}].concat(spec.series.map(([label, colour, , dash]) => ({
        label, stroke: colour, width: 1.6, spanGaps: false, dash,
        fill: spec.fill ? colour + "22" : undefined,
        value: (u, v) => (v == null ? "–" : v.toFixed(v < 10 ? 1 : 0)),
      }))),
    };
    const data = [[]].concat(spec.series.map(() => []));
    charts.push({ spec, box, data, plot: new uPlot(opts, data, box) });
  });
  new ResizeObserver(() => {
    for (const c of charts) c.plot.setSize({ width: c.box.clientWidth - 12, height: 170 });
  }).observe(grid);
}

function onSnapshot(snap) {
  const t = Date.now() / 1000;
  for (const c of charts) {
    c.data[0].push(t);
    c.spec.series.forEach(([, , get], i) => {
      const v = get(snap, prev);
      c.data[i + 1].push(v === undefined || Number.isNaN(v) ? null : v);
    });
    if (c.data[0].length > HISTORY) c.data.forEach((a) => a.shift());
    c.plot.setData(c.data);
  }
  const fmt = (v, unit) => (v == null ? "–" : `${v < 10 ? v.toFixed(1) : Math.round(v)}${unit}`);
  document.getElementById("t-toks").textContent = fmt(tokPerSecond(snap, prev), "");
  document.getElementById("t-running").textContent = snap.running;
  document.getElementById("t-waiting").textContent = snap.waiting;
  document.getElementById("t-kv").textContent = fmt(100 * snap.kv.usage, " %");
  document.getElementById("t-ttft").textContent = fmt(snap.window.ttft.p99_ms, " ms");
  document.getElementById("t-itl").textContent = fmt(snap.window.itl.p99_ms, " ms");
  const b = snap.batching;
  document.getElementById("t-budget").textContent = b.max_batch_tokens;
  document.getElementById("t-budget-src").textContent = `step budget (${b.source})`;
  document.getElementById("t-cap").textContent = b.running_cap == null ? "none" : b.running_cap;
  // The core and its front ends (absent when one process serves everything): the worst event
  // loop's lag P99, the wait a busy process adds to each of its streams.
  const p = snap.processes;
  const cores = p ? (p.cores || [p.core]) : [];
  const lags = p ? [...cores.map((c) => c.loop_lag_p99_ms), ...p.frontends.map((f) => f.loop_lag_p99_ms)] : [];
  document.getElementById("t-procs").textContent = p ? cores.length + p.frontends.length : 1;
  document.getElementById("t-procs-label").textContent = p
    ? `${cores.length === 1 ? "core" : cores.length + " cores"} + ${p.frontends.length} front ends; ` +
      `worst loop lag P99 ${fmt(Math.max(0, ...lags.filter((v) => v != null)), " ms")}`
    : "process (one serves everything)";
  showCores(snap.cores, fmt);
  document.getElementById("model").textContent =
    `${snap.model} · ${snap.requests_finished} requests · up ${Math.round(snap.uptime_s)} s`;
  prev = snap;
  document.body.dataset.updates = ++updates;  // browser tests watch this
}

// Data-parallel cores (--data-parallel-size), one tile each: its own load, or that it is down.
function showCores(cores, fmt) {
  const box = document.getElementById("cores");
  box.hidden = !cores;
  if (!cores) return;
  box.replaceChildren(...cores.map((c) => {
    const tile = document.createElement("div");
    tile.className = c.up ? "tile" : "tile down";
    const head = document.createElement("b");
    head.textContent = c.up ? `${fmt(c.throughput_tok_s, "")} tok/s` : "down";
    const line = document.createElement("span");
    line.textContent = c.up
      ? `core ${c.core}: ${c.running} running, ${c.waiting} waiting, KV ${fmt(100 * c.kv_usage, " %")}, ` +
        `${c.requests_finished} finished`
      : `core ${c.core}: restarting or gone; its requests ended with errors`;
    tile.append(head, line);
    return tile;
  }));
}

// A server started with --api-key: the key comes as /dashboard#api_key=KEY, or from the chat
// page's sessionStorage when the dashboard was opened from it.
const apiKey = new URLSearchParams(location.hash.slice(1)).get("api_key") || sessionStorage.getItem("api_key");
if (apiKey) sessionStorage.setItem("api_key", apiKey);

let retryMs = 500;
function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const query = apiKey ? `?api_key=${encodeURIComponent(apiKey)}` : "";
  const ws = new WebSocket(scheme + location.host + "/v1/stats" + query);
  ws.onopen = () => { retryMs = 500; document.getElementById("conn").classList.add("up"); };
  ws.onmessage = (e) => onSnapshot(JSON.parse(e.data));
  ws.onclose = () => {
    document.getElementById("conn").classList.remove("up");
    prev = null;  // a restarted server starts its counters again
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 8000);
  };
}

makeCharts();
connect();
