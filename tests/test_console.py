"""The web console (appliance/console): headers and assets over HTTP, then the real thing in headless Chromium.

The HTTP tests use create_app() in-process (no model is loaded: the lifespan never runs). The browser tests
drive Debian's `chromium` through Playwright (`executable_path`: Playwright downloads nothing) against a
real server on the embedded model: streaming, stop, status, HTML injection, API keys and agent threads.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect
from starlette.testclient import TestClient

from appliance.app import create_app
from appliance.config import Settings
from appliance.console import CSP, STATIC_DIR
from appliance.security.keys import KeyEntry, KeysFile, hash_key, new_key, write_keys_file
from tests.conftest import Server, start_server
from tests.test_embeddings import wait_for_embeddings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]
TIMEOUT_MS = 60_000
slow = pytest.mark.slow

# -- HTTP level: no model, no browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path_factory.mktemp("console-http"))))


def assert_console_headers(r: httpx.Response) -> None:
    assert r.headers["content-security-policy"] == CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-frame-options"] == "DENY"


def test_index_is_served_with_csp_and_no_cache(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert_console_headers(r)
    assert r.headers["cache-control"] == "no-cache" and r.headers["etag"]
    for directive in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "form-action 'none'"):
        assert directive in r.headers["content-security-policy"]
    assert '<script type="module" src="/console/console.js">' in r.text
    # revalidation is cheap: the ETag answers 304, with the headers still on
    r2 = client.get("/", headers={"If-None-Match": r.headers["etag"]})
    assert r2.status_code == 304 and not r2.content
    assert_console_headers(r2)
    assert client.post("/").status_code == 405


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
        ("/console/favicon.svg", "image/svg+xml"),
        ("/console/index.html", "text/html"),
    ],
)
def test_assets_have_their_content_types(client: TestClient, path: str, content_type: str) -> None:
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith(content_type)
    assert_console_headers(r)
    assert r.headers["cache-control"] == "no-cache" and r.headers["etag"] and r.headers["last-modified"]
    assert client.get(path, headers={"If-None-Match": r.headers["etag"]}).status_code == 304


def test_missing_assets_and_favicon(client: TestClient) -> None:
    r = client.get("/console/no-such-file.js")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert_console_headers(r)
    r = client.post("/")
    assert r.status_code == 405
    assert "message" in r.json()["error"]
    r = client.get("/favicon.ico")
    assert r.status_code == 204
    assert_console_headers(r)


def test_console_is_open_but_the_api_needs_a_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys.toml"
    write_keys_file(keys, KeysFile(keys={"admin": KeyEntry(sha256=hash_key(new_key()))}))
    c = TestClient(create_app(Settings(data_dir=tmp_path, keys_file=keys)))
    for path in ("/", "/console/console.js", "/console/console.css", "/favicon.ico"):
        assert c.get(path).status_code in (200, 204), path
    assert c.get("/v1/models").status_code == 401
    assert c.get("/metrics").status_code == 401


def static_files() -> list[Path]:
    files = sorted(p for p in STATIC_DIR.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"index.html", "console.css", "console.js", "favicon.svg"}
    return files


def test_static_files_reference_nothing_outside_the_appliance() -> None:
    """Offline: no CDN, no web font, no absolute URL to anywhere (an SVG's XML namespace is not a fetch)."""
    allowed = {"http://www.w3.org/2000/svg"}
    for path in static_files():
        text = path.read_text()
        urls = set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"'`)]*", text)) - allowed
        assert not urls, f"{path.name}: {urls}"
        assert "@import" not in text and "@font-face" not in text, path.name


def test_no_inline_script_or_style_in_the_page() -> None:
    """The CSP forbids inline code: every <script> has a src, no <style>, no style= or on*= attributes."""
    html = (STATIC_DIR / "index.html").read_text()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert 'src="/console/' in tag, tag
    assert "<style" not in html
    assert not re.search(r"\sstyle\s*=", html)
    assert not re.search(r"\son[a-z]+\s*=", html)


def test_console_js_uses_no_html_sinks() -> None:
    """A guard on top of the browser tests: the script never parses strings as HTML or code."""
    js = (STATIC_DIR / "console.js").read_text()
    code = re.sub(r"^\s*//.*$", "", js, flags=re.M)  # comments may talk about them
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "localStorage",
    ):
        assert sink not in code, sink
    assert "sessionStorage" in code and "textContent" in code


# -- in Chromium -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium package (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(browser: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module (the embedding model loads when the agent test, the last one, needs it)."""
    s = start_server(tmp_path_factory.mktemp("console"), "--context-size", "4096")
    yield s
    s.stop()


class Page:
    """A Playwright page plus what its console said (CSP violations would show up there)."""

    def __init__(self, browser, base_url: str):
        self.context = browser.new_context(base_url=base_url)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.messages: list[str] = []
        self.page.on("console", lambda m: self.messages.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.messages.append(f"pageerror: {e}"))

    def check_clean(self) -> None:
        bad = [m for m in self.messages if "Content Security Policy" in m or m.startswith("pageerror")]
        assert not bad, bad


@pytest.fixture
def page(browser, server: Server) -> Iterator:
    p = Page(browser, server.base_url)
    yield p
    p.context.close()
    p.check_clean()


def wait_js(page, expression: str, timeout: float = TIMEOUT_MS / 1000) -> Any:
    """Wait until `expression` is truthy in the page; return its value.

    page.wait_for_function() cannot be used: it evals its predicate inside the page, which the console's
    CSP (no 'unsafe-eval') refuses. page.evaluate() goes through DevTools and is not subject to it."""
    deadline = time.monotonic() + timeout
    while not (value := page.evaluate(expression)):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(50)
    return value


def wait_models(page) -> None:
    expect(page.locator("body")).to_have_attribute("data-models-loaded", "1", timeout=TIMEOUT_MS)


def open_console(page, model: str | None = None):
    page.goto("/")
    wait_models(page)
    if model:
        page.select_option("#model", value=model)
    return page


def send(page, text: str, max_tokens: int, temperature: float | None = None) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", "" if temperature is None else str(temperature))
    page.fill("#input", text)
    page.press("#input", "Enter")


LAST_ANSWER = "[...document.querySelectorAll('.msg.assistant')].pop()"


def wait_done(page) -> str:
    """Wait for the last answer to finish; return its text."""
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-done", "1", timeout=TIMEOUT_MS)
    return page.evaluate(f"{LAST_ANSWER}.querySelector('.body').textContent")


def assert_idle(page) -> None:
    assert page.is_enabled("#send") and page.is_disabled("#stop")


def errors_shown(page) -> list[str]:
    return page.eval_on_selector_all(".msg.error .body", "els => els.map(e => e.textContent)")


def default_model(server: Server) -> str:
    return server.health(verbose=True)["default_model"]


@slow
def test_chat_streams_token_by_token(page: Page, server: Server, tmp_path: Path) -> None:
    pg = open_console(page.page, default_model(server))
    # record every length the answer bubble goes through
    pg.evaluate(
        """() => {
        window.__lengths = [];
        new MutationObserver(() => {
          const b = [...document.querySelectorAll('.msg.assistant .body')].pop();
          if (b) window.__lengths.push([b.textContent.length, document.getElementById('stop').disabled]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
      }"""
    )
    send(pg, "Hello! Who are you?", max_tokens=32)
    text = wait_done(pg)
    assert text.strip()
    seen = pg.evaluate("window.__lengths")
    lengths = [n for n, _ in seen]
    partial = sorted({n for n, stop_disabled in seen if 0 < n < len(text) and not stop_disabled})
    assert len(partial) >= 2, seen  # seen growing (with Stop on) before the end, not just empty → whole
    assert lengths == sorted(lengths)
    assert pg.inner_text(".msg.user .body") == "Hello! Who are you?"
    assert not errors_shown(pg)
    assert_idle(pg)
    pg.screenshot(path=tmp_path / "console.png", full_page=True)
    assert (tmp_path / "console.png").stat().st_size > 1000


@slow
def test_stop_a_long_stream(page: Page, server: Server) -> None:
    pg = open_console(page.page, default_model(server))
    bodies: list[dict] = []
    pg.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    send(pg, "Write a very long essay about the sea.", max_tokens=1500, temperature=0)
    wait_js(pg, f"{LAST_ANSWER}.querySelector('.body').textContent.length > 40")
    pg.click("#stop")
    text = wait_done(pg)
    assert pg.is_visible(".msg.assistant .stopped")
    assert_idle(pg)
    pg.wait_for_timeout(1000)  # nothing more arrives after the stop
    assert pg.evaluate(f"{LAST_ANSWER}.querySelector('.body').textContent") == text
    # the server let go of the generation: the slot is free again
    deadline = time.monotonic() + 30
    while server.backend()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.backend()["in_flight"] == 0
    # and the conversation goes on, with the partial answer in its history
    send(pg, "Now say hi.", max_tokens=12)
    assert wait_done(pg).strip()
    assert not errors_shown(pg)
    assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[0]["max_tokens"] == 1500 and bodies[0]["temperature"] == 0 and bodies[0]["stream"] is True
    # New conversation clears it all
    pg.click("#new-chat")
    assert pg.locator(".msg").count() == 0


@slow
def test_status_panel(page: Page, server: Server) -> None:
    pg = open_console(page.page)
    model = default_model(server)
    wait_js(pg, f"document.querySelector('#st-models li[data-model=\"{model}\"] .state')?.textContent === 'ready'")
    assert pg.inner_text("#st-health") == "ok" and pg.inner_text("#health-badge") == "ok"
    # generations happened in the tests before: TTFT and decode speed are known; tokens/s after two polls
    wait_js(pg, "document.getElementById('st-ttft').textContent.endsWith(' ms')")
    wait_js(pg, "/^\\d/.test(document.getElementById('st-tps').textContent)")
    assert re.fullmatch(r"[\d.]+ tok/s", pg.inner_text("#st-decode"))
    assert re.fullmatch(r"[\d.]+ \w?i?B / [\d.]+ \w?i?B", pg.inner_text("#st-mem"))
    assert pg.inner_text("#st-rss").endswith("B") and pg.inner_text("#st-cpu").endswith("%")
    assert "free of" in pg.inner_text("#st-disk")
    assert pg.is_hidden("#st-metrics-note")
    # it refreshes on its own
    before = pg.inner_text("#st-updated")
    wait_js(pg, f"document.getElementById('st-updated').textContent !== {json.dumps(before)}")


@slow
def test_model_and_user_text_cannot_inject_html(page: Page, server: Server) -> None:
    pg = open_console(page.page, default_model(server))
    evil = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script> **bold**'
    send(pg, evil, max_tokens=8)
    wait_done(pg)
    assert pg.inner_text(".msg.user .body") == evil  # shown literally
    assert pg.evaluate("window.__pwned") is None
    assert pg.locator("#messages img, #messages script").count() == 0
    # the markdown renderer (used for model output) on hostile text
    result = pg.evaluate(
        """async () => {
        const { renderMarkdown } = await import('/console/console.js');
        const md = [
          '# Title <b>x</b>',
          '<img src=x onerror="window.__pwned=3">',
          '```html', '<script>window.__pwned=4</script>', '```',
          'Some **bold**, *italic* and `<code>`.',
          '- [bad](javascript:alert(1)) [data](data:text/html,hi) [ok](https://example.com/a)',
          '1. one', '2. two',
        ].join('\\n');
        const root = renderMarkdown(md);
        document.getElementById('messages').append(root);
        await new Promise((r) => setTimeout(r, 100));
        return {
          tags: [...root.querySelectorAll('*')].map((e) => e.tagName.toLowerCase()),
          links: [...root.querySelectorAll('a')].map((a) => [a.getAttribute('href'), a.rel, a.target, a.textContent]),
          code: root.querySelector('pre code').textContent,
          lang: root.querySelector('pre').dataset.lang,
          text: root.textContent,
        };
      }"""
    )
    assert pg.evaluate("window.__pwned") is None
    assert not {"img", "script", "b"} & set(result["tags"]), result["tags"]
    assert {"h1", "p", "pre", "code", "strong", "em", "ul", "ol", "li", "a"} <= set(result["tags"])
    assert result["links"] == [["https://example.com/a", "noopener noreferrer", "_blank", "ok"]]
    assert result["code"] == "<script>window.__pwned=4</script>" and result["lang"] == "html"
    assert '<img src=x onerror="window.__pwned=3">' in result["text"] and "<b>x</b>" in result["text"]
    assert "javascript:alert(1)" in result["text"]


@slow
def test_api_key_prompt_and_session_storage(browser, tmp_path: Path) -> None:
    key = new_key()
    keys = tmp_path / "keys.toml"
    write_keys_file(keys, KeysFile(keys={"console": KeyEntry(sha256=hash_key(key), role="admin")}))
    server = start_server(tmp_path, "--context-size", "512", env={"APPLIANCE_KEYS_FILE": str(keys)})
    p = Page(browser, server.base_url)
    try:
        pg = p.page
        pg.goto("/")
        pg.wait_for_selector("#key-dialog", state="visible")
        wait_js(pg, "document.getElementById('st-metrics-note').textContent.includes('need a key')")
        assert pg.locator("#model option").count() <= 1
        pg.fill("#key-input", "sk-app-wrong")
        pg.press("#key-input", "Enter")
        wait_js(pg, "document.getElementById('key-error').textContent.includes('Incorrect API key')")
        assert pg.is_visible("#key-dialog")
        pg.fill("#key-input", key)
        pg.click("#key-submit")
        wait_models(pg)
        assert pg.is_hidden("#key-dialog")
        verbose = httpx.get(
            f"{server.base_url}/health", params={"verbose": 1}, headers={"Authorization": f"Bearer {key}"}
        ).json()
        assert verbose["default_model"] in pg.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
        wait_js(pg, "/\\d+ requests/.test(document.getElementById('st-usage').textContent)")
        assert pg.evaluate("sessionStorage.getItem('appliance.apiKey')") == key
        assert pg.evaluate("localStorage.length") == 0 and pg.evaluate("document.cookie") == ""
        wait_js(pg, "document.getElementById('st-mem').textContent.includes('/')")  # metrics with the key
        # a reload keeps the key (same tab); "forget" drops it and asks again
        pg.reload()
        wait_models(pg)
        assert pg.is_hidden("#key-dialog")
        pg.click("#forget-key")
        pg.wait_for_selector("#key-dialog", state="visible")
        assert pg.evaluate("sessionStorage.length") == 0
        p.context.close()
        p.check_clean()
    finally:
        server.stop()


@slow
def test_agent_threads_listed_and_reopened(page: Page, server: Server) -> None:
    wait_for_embeddings(server)  # the agent recalls memories: its first turn would wait for the model anyway
    pg = open_console(page.page, "agent")
    send(pg, "My name is Ada. Say hello.", max_tokens=24)
    assert wait_done(pg) is not None
    assert not errors_shown(pg)
    tid = pg.inner_text("#thread-label").removeprefix("thread ").strip()
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", tid)
    pg.wait_for_selector(f'#thread-list button[data-thread-id="{tid}"]')
    # reload: the thread comes back from the server's history
    pg.reload()
    wait_models(pg)
    pg.click(f'#thread-list button[data-thread-id="{tid}"]')
    wait_js(pg, "document.querySelector('.msg.user .body')?.textContent === 'My name is Ada. Say hello.'")
    assert pg.locator(".msg.assistant").count() >= 1
    assert pg.input_value("#model") == "agent" and tid in pg.inner_text("#thread-label")
    # and it continues: the next turn goes to the same thread
    send(pg, "What is my name?", max_tokens=16)
    wait_done(pg)
    assert not errors_shown(pg)
    doc = httpx.get(f"{server.base_url}/v1/threads/{tid}", timeout=30).json()
    assert [m["content"] for m in doc["messages"] if m["role"] == "user"] == [
        "My name is Ada. Say hello.",
        "What is my name?",
    ]
