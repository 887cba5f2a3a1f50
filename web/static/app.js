// Chat page client: one websocket to /v1/stream?batch=1 (each message an array of the frames ready
// together: parallel chats share one socket), one answer streaming at a time,
// the conversation kept here and sent whole as "messages" so the server applies the chat template.
// "Launch N parallel chats" fires N independent one-question generations on the same socket.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null,
  history: [],   // [{role, content}] of finished turns
  live: null,    // the answer now streaming: {id, text, body, stats, started}
  parallel: new Map(),  // id -> {text, body, stats} of the parallel chats still streaming
  nextId: 1,
  retryMs: 500,
};

// A server started with --api-key needs the key: open the page as /#api_key=KEY (a fragment never
// reaches the server or its logs), or type it when asked. Websockets cannot carry an Authorization
// header from a browser, so the socket sends it as ?api_key=; fetches use the header.
const apiKey = { value: new URLSearchParams(location.hash.slice(1)).get("api_key") || sessionStorage.getItem("api_key") };
const authHeaders = () => (apiKey.value ? { Authorization: `Bearer ${apiKey.value}` } : {});

async function ensureKey() {
  const r = await fetch("/healthz", { headers: authHeaders() }).catch(() => null);
  if (r && r.status === 401) {
    apiKey.value = window.prompt("This server needs an API key:") || null;
    if (apiKey.value) sessionStorage.setItem("api_key", apiKey.value);
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const query = "?batch=1" + (apiKey.value ? `&api_key=${encodeURIComponent(apiKey.value)}` : "");
  const ws = new WebSocket(scheme + location.host + "/v1/stream" + query);
  ws.onopen = () => {
    state.retryMs = 500;
    $("conn").classList.add("up");
    refreshHealth();
    updateButtons();
  };
  ws.onclose = () => {
    $("conn").classList.remove("up");
    state.ws = null;
    if (state.live) endLive("connection lost; the partial answer was kept");
    for (const id of [...state.parallel.keys()]) endParallel(id, "connection lost");
    updateButtons();
    // Reconnect with backoff so a restarted server is picked up without a page reload.
    setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 8000);
  };
  ws.onmessage = (event) => JSON.parse(event.data).forEach(onFrame);
  state.ws = ws;
}

function onFrame(frame) {
  if (state.parallel.has(frame.id)) return onParallelFrame(frame);
  const live = state.live;
  if (frame.type === "error" && (frame.id === null || !live || frame.id !== live.id)) {
    note(`${frame.code}: ${frame.message}`, true);
    return;
  }
  if (!live || frame.id !== live.id) return;  // a late frame of an answer already ended here
  if (frame.type === "token") {
    live.text += frame.text;
    live.body.textContent = live.text;
    scrollDown();
  } else if (frame.type === "done") {
    state.history.push({ role: "assistant", content: live.text });
    live.stats.textContent = describe(frame);
    endLive(null);
    refreshHealth();
  } else if (frame.type === "error") {
    // The turn failed: drop the question from the history so the next one is not built on it.
    state.history.pop();
    endLive(`${frame.code}: ${frame.message}`);
  }
}

function describe(done) {
  const t = done.timing, n = done.usage.completion_tokens;
  const parts = [done.finish_reason, `${n} tokens`];
  if (t.ttft_ms !== null) parts.push(`TTFT ${Math.round(t.ttft_ms)} ms`);
  // Decode speed excludes the first token, whose time is prefill (TTFT).
  if (n > 1 && t.total_ms > t.ttft_ms) {
    parts.push(`${((n - 1) / ((t.total_ms - t.ttft_ms) / 1000)).toFixed(1)} tok/s`);
  }
  if (t.queue_ms !== null && t.queue_ms >= 1) parts.push(`queued ${Math.round(t.queue_ms)} ms`);
  return parts.join(" · ");
}

function send() {
  const text = $("input").value.trim();
  if (!text || state.live || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  $("input").value = "";
  const hint = document.querySelector(".hint");
  if (hint) hint.remove();
  bubble("user", text);
  state.history.push({ role: "user", content: text });

  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(state.history);
  const id = `chat-${state.nextId++}`;
  const body = bubble("assistant", "");
  body.classList.add("live");
  const stats = document.createElement("span");
  stats.className = "stats";
  body.after(stats);
  state.live = { id, text: "", body, stats };
  state.ws.send(JSON.stringify({
    type: "generate", id, messages,
    ...settings(),
  }));
  updateButtons();
}

function stop() {
  if (!state.ws) return;
  if (state.live) state.ws.send(JSON.stringify({ type: "cancel", id: state.live.id }));
  for (const id of state.parallel.keys()) state.ws.send(JSON.stringify({ type: "cancel", id }));
}

const QUESTIONS = [
  "Write a haiku about the sea.", "What is the capital of France?", "Explain photosynthesis briefly.",
  "Give me three tips for learning to cook.", "Why is the sky blue?", "Tell me a short story about a cat.",
  "What is a prime number?", "Name three planets and one fact about each.",
];

function settings() {
  return {
    max_tokens: intOr($("max_tokens").value, 256),
    temperature: numOr($("temperature").value, 0),
    top_p: numOr($("top_p").value, 1),
  };
}

function launchParallel() {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  const n = Math.min(64, Math.max(1, intOr($("parallel").value, 4)));
  const hint = document.querySelector(".hint");
  if (hint) hint.remove();
  const lanes = document.createElement("div");
  lanes.className = "lanes";
  $("log").append(lanes);
  const system = $("system").value.trim();
  const batch = state.nextId++;
  for (let i = 0; i < n; i++) {
    const id = `par-${batch}-${i + 1}`, question = QUESTIONS[i % QUESTIONS.length];
    const card = document.createElement("div");
    card.className = "lane";
    card.dataset.id = id;
    const q = document.createElement("div");
    q.className = "question";
    q.textContent = `#${i + 1} ${question}`;
    const body = document.createElement("div");
    body.className = "msg assistant live";
    const stats = document.createElement("span");
    stats.className = "stats";
    card.append(q, body, stats);
    lanes.append(card);
    state.parallel.set(id, { text: "", body, stats });
    const messages = (system ? [{ role: "system", content: system }] : []).concat(
      [{ role: "user", content: question }]);
    state.ws.send(JSON.stringify({ type: "generate", id, messages, ...settings() }));
  }
  scrollDown();
  updateButtons();
}

function onParallelFrame(frame) {
  const lane = state.parallel.get(frame.id);
  if (frame.type === "token") {
    lane.text += frame.text;
    lane.body.textContent = lane.text;
  } else if (frame.type === "done") {
    lane.stats.textContent = describe(frame);
    lane.body.parentElement.classList.add(`done-${frame.finish_reason}`);
    endParallel(frame.id, null);
  } else if (frame.type === "error") {
    endParallel(frame.id, `${frame.code}: ${frame.message}`);
  }
}

function endParallel(id, error) {
  const lane = state.parallel.get(id);
  lane.body.classList.remove("live");
  if (error) {
    lane.stats.textContent = error;
    lane.stats.classList.add("error");
  }
  state.parallel.delete(id);
  updateButtons();
}

function endLive(error) {
  const live = state.live;
  live.body.classList.remove("live");
  if (error) {
    live.stats.textContent = error;
    live.stats.classList.add("error");
  }
  state.live = null;
  updateButtons();
  $("input").focus();
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("log").append(div);
  scrollDown();
  return div;
}

function note(text, isError) {
  const p = document.createElement("p");
  p.className = isError ? "muted error" : "muted";
  p.textContent = text;
  $("log").append(p);
  scrollDown();
}

function scrollDown() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

function updateButtons() {
  const open = state.ws && state.ws.readyState === WebSocket.OPEN;
  $("send").disabled = !open || state.live !== null;
  $("stop").disabled = !open || (state.live === null && state.parallel.size === 0);
  $("launch").disabled = !open;
}

async function refreshHealth() {
  try {
    const h = await (await fetch("/healthz", { headers: authHeaders() })).json();
    $("model").textContent = `${h.model} · context ${h.max_context}`;
    $("kv").textContent = `KV ${h.kv.used_blocks}/${h.kv.total_blocks} blocks`;
  } catch (err) {
    $("model").textContent = "health check failed";
  }
}

const intOr = (v, d) => (Number.isInteger(Number(v)) && v !== "" ? Number(v) : d);
const numOr = (v, d) => (v !== "" && Number.isFinite(Number(v)) ? Number(v) : d);

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", stop);
$("launch").addEventListener("click", launchParallel);
$("clear").addEventListener("click", () => {
  if (state.live) {
    stop();
    endLive(null);  // its late frames no longer match a live id and are dropped
  }
  stop();  // cancels the parallel chats still streaming
  for (const id of [...state.parallel.keys()]) endParallel(id, null);
  state.history = [];
  $("log").replaceChildren();
  note("New chat.", false);
});
ensureKey().then(connect);
