"""The chat page and the dashboard in a real browser: Playwright driving Debian's Chromium against
the real server (embedded SmolLM2) on 127.0.0.1. Screenshots go to artifacts/browser/.

Plain sync tests: Playwright's sync API runs its own event loop, so the server runs in a
background thread with its own trio.run.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import pytest
import trio

from streamer.config import EngineConfig

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "browser"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
WAIT_MS = 60_000  # the embedded model on a busy 2-core CI box

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"),
]


class ServerThread:
    """The engine and hypercorn in a thread of their own, stopped through trio's token."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._started: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> str:
        self._thread.start()
        url = self._started.get(timeout=300)
        if isinstance(url, BaseException):
            raise url
        return url

    def stop(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to start() when it happens before ready
            self._started.put(exc)

    async def _main(self) -> None:
        from streamer.engine import open_engine
        from web.server import serve

        self._token, self._stop = trio.lowlevel.current_trio_token(), trio.Event()
        async with open_engine(self.config) as engine, trio.open_nursery() as nursery:
            binds = await nursery.start(serve, engine, "127.0.0.1", 0)
            self._started.put(binds[0])
            await self._stop.wait()
            nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def url():
    server = ServerThread(EngineConfig(model="smollm2", kv_memory=0.05))
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, url, request):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, errors  # no uncaught script errors on the page


def open_chat(page, url: str, max_tokens: int) -> None:
    page.goto(url + "/")
    page.wait_for_selector("#conn.up")
    page.click("#settings summary")
    page.fill("#max_tokens", str(max_tokens))


def test_answer_streams_token_by_token(page, url):
    open_chat(page, url, 24)
    # Record the answer's length at every change of the log, in the page: no polling races.
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const live = document.querySelector('.msg.assistant.live');
            if (live) window.lengths.push(live.textContent.length);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#input", "What is the capital of France?")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.stats')?.textContent || '').length > 0")
    answer = page.locator(".msg.assistant").first.text_content()
    lengths = page.evaluate("window.lengths")
    partial = {n for n in lengths if 0 < n < len(answer)}
    assert len(partial) >= 2, (lengths, answer)  # seen part-way, at two different lengths
    assert page.locator(".msg.assistant.live").count() == 0
    stats = page.locator(".stats").first.text_content()
    assert "tokens" in stats and "TTFT" in stats and "tok/s" in stats, stats


def test_stop_ends_the_answer_as_cancelled(page, url):
    open_chat(page, url, 400)
    page.fill("#input", "Tell me a very long story about a dragon.")
    page.press("#input", "Enter")
    page.wait_for_function("(document.querySelector('.msg.assistant.live')?.textContent || '').length > 3")
    page.click("#stop")
    page.wait_for_function("(document.querySelector('.stats')?.textContent || '').startsWith('cancelled')")
    assert page.locator(".msg.assistant.live").count() == 0
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


def test_four_parallel_chats_all_finish(page, url):
    open_chat(page, url, 12)
    page.fill("#parallel", "4")
    page.click("#launch")
    page.wait_for_function("document.querySelectorAll('.lane').length === 4")
    page.wait_for_function("document.querySelectorAll('.lane.done-stop, .lane.done-length').length === 4")
    stats = page.locator(".lane .stats").all_text_contents()
    assert len(stats) == 4 and all("TTFT" in s for s in stats), stats
    assert page.locator(".lane .error").count() == 0


def test_dashboard_charts_update(page, browser, url):
    page.goto(url + "/dashboard")
    page.wait_for_function("Number(document.body.dataset.updates || 0) >= 2")
    assert page.locator(".chart canvas").count() == 7
    itl = page.locator(".chart").nth(2).text_content()  # the ITL chart's legend: queued, sent, the loop's lag
    assert "Inter-token latency" in itl and "P99 sent" in itl and "loop lag P99" in itl, itl
    # Traffic from a chat page in another tab; the dashboard's figures follow it.
    chat = browser.new_page()
    open_chat(chat, url, 12)
    chat.fill("#parallel", "2")
    chat.click("#launch")
    chat.wait_for_function("document.querySelectorAll('.lane.done-stop, .lane.done-length').length === 2",
                           timeout=WAIT_MS)
    chat.close()
    before = int(page.evaluate("document.body.dataset.updates"))
    page.wait_for_function(f"Number(document.body.dataset.updates) >= {before + 2}")
    assert page.locator("#t-ttft").text_content().endswith("ms")  # a P99 over the last 60 s
    assert "requests" in page.locator("#model").text_content()
    assert page.locator("#t-budget").text_content() == "512"  # the CPU's default budget, shown
    assert page.locator("#t-cap").text_content() == "none"
    assert page.locator("#t-procs-label").text_content() == "process (one serves everything)"  # in-process server
    points = page.evaluate("document.body.dataset.updates")
    assert int(points) >= before + 2


def test_dashboard_shows_each_data_parallel_core(browser):
    """Two cores behind one front end: a tile each, with its load."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "streamer", "serve", "--model", "random:tiny-qwen3", "--port", "0",
                             "--kv-memory", "0.05", "--data-parallel-size", "2", "--frontends", "1"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:
            if "Streamer ready" in line:
                server = json.loads(line)["url"].rstrip("/")
                break
        threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # keep the pipe drained
        page = browser.new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server + "/dashboard")
        page.wait_for_function("Number(document.body.dataset.updates || 0) >= 2")
        tiles = page.locator("#cores .tile")
        assert tiles.count() == 2
        assert [tiles.nth(i).locator("span").text_content().split(":")[0] for i in range(2)] == ["core 0", "core 1"]
        assert page.locator("#t-procs-label").text_content().startswith("2 cores + 1 front ends")
        page.close()
        assert not errors, errors
    finally:
        proc.terminate()
        proc.wait(timeout=30)
