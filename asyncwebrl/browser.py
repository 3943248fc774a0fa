"""The browser machinery under 01_env.BrowserEnv: a tiny HTTP server for MiniWoB++'s pages on 127.0.0.1, one
headless chromium (Debian's, driven by Playwright) that many episode slots share and relaunch when it dies, the
browser's settings, and the JavaScript that reads a page's task status and element marks in one round trip.
"""
from __future__ import annotations

import asyncio
import functools
import sys
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin, urlsplit

try:
    import miniwob

    MINIWOB_HTML = Path(miniwob.__file__).parent / "html"
except ImportError:  # asyncwebrl.suites says what to install
    MINIWOB_HTML = None

# ----------------------------------------------------------------------------------------------------------------
# Local pages: a tiny HTTP server on 127.0.0.1 (MiniWoB++'s pages need http:// for some tasks).


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per request would drown the training log
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a page closed mid-download: nothing went wrong
            super().handle_error(request, client_address)


class TaskServer:
    """Serves a folder (MiniWoB++'s html/ by default) on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or MINIWOB_HTML)
        self._httpd = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=self.root))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True, name="task-server")
        self._thread.start()
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}/"

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# The browser


@dataclass
class EnvConfig:
    viewport: tuple[int, int] = (1280, 768)  # the paper's viewport
    jpeg_quality: int = 60  # on MiniWoB++'s flat pages q60 is ~0.9x a PNG of the same area, 0.21 of a 1280x768
    # PNG (env_bench); it pays off on photo-rich sites, where PNGs grow much faster than JPEGs
    step_timeout_s: float = 10.0  # an action + observation slower than this ends the episode ("timeout")
    max_elements: int = 24  # element marks listed in the observation's text channel
    chromium: str = "/usr/bin/chromium"  # Debian's chromium; never `playwright install`


MINIWOB_AREA = (0, 0, 160, 210)  # MiniWoB++ draws every task in this top-left box: screenshot only that
# ...and needs no more window than that. Measured here: with 8 pages of 1280x768, screenshots/s fell to half of
# 4 pages; with 320x240 they kept rising (every open page's compositor frame costs CPU on 2 cores).
MINIWOB_VIEWPORT = (320, 240)
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update",
                  # keep timers of background pages running: many episode pages are open at once
                  "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                  "--disable-backgrounding-occluded-windows"]


# Visible, interactable or text-bearing elements of the task area, in document order, with their boxes.
ELEMENTS_JS = """([clip, limit]) => {
  const skip = '#query, #reward-display, #sync-task-cover, #click-canvas';
  const clickable = 'input,textarea,select,button,a,label,option,[onclick],[role=button],[role=link],[tabindex]';
  const found = [];
  for (const el of document.body.querySelectorAll('*')) {
    // cheap tests first: layout (rects, styles) is what costs time on a 2-core machine
    const leaf = el.children.length === 0, hit = el.matches(clickable);
    if (!hit && !leaf) continue;
    const own = [...el.childNodes].filter(n => n.nodeType === 3).map(n => n.data).join(' ').replace(/\\s+/g, ' ').trim();
    if (!hit && !own) continue;
    if (el.closest(skip)) continue;
    const r = el.getBoundingClientRect();
    if (r.width < 1 || r.height < 1) continue;
    if (r.right <= clip[0] || r.bottom <= clip[1] || r.left >= clip[0] + clip[2] || r.top >= clip[1] + clip[3]) continue;
    if (getComputedStyle(el).visibility === 'hidden') continue;
    let tag = el.tagName.toLowerCase(), text = own || el.textContent || el.getAttribute('title') || '', value = null;
    if (tag === 'input') {
      tag += '[' + el.type + ']';
      if (el.type === 'checkbox' || el.type === 'radio') {
        value = el.checked ? 'checked' : 'unchecked';
        text = (el.closest('label') || {}).textContent || el.value || '';
      } else { value = el.value; text = el.placeholder || el.name || ''; }
    } else if (tag === 'textarea' || tag === 'select') value = el.value;
    found.push({el, tag, text: text.replace(/\\s+/g, ' ').trim(), box: [r.left, r.top, r.width, r.height], value});
  }
  // nested elements with the same text (li > a, label > input): keep the innermost, the one a click should hit
  const kept = found.filter(f => !found.some(g => g !== f && f.el.contains(g.el) && g.text === f.text));
  return kept.slice(0, limit).map(({el, ...rest}) => rest);
}"""
# MiniWoB++: seed and (re)start the page's episode (no reload needed). Every page: the key of the history entry the
# episode starts on (the Navigation API: each entry has a key, and entries() lists this origin's entries in order).
START_JS = """([seed]) => {
  if (seed !== null) { Math.seedrandom(seed); core.EPISODE_MAX_TIME = 1e9; core.startEpisodeReal(); }
  return window.navigation ? navigation.currentEntry.key : null;
}"""
CAN_GO_BACK_JS = """first => {
  if (!window.navigation) return history.length > 1;
  const i = navigation.entries().findIndex(e => e.key === first);  // -1: the episode has moved to another origin
  return navigation.canGoBack && i < navigation.currentEntry.index;
}"""
STATUS_JS = """() => {
  if (typeof core === 'undefined') return null;  // not a MiniWoB++ page
  let goal = core.getUtterance(); if (typeof goal !== 'string') goal = goal.utterance;
  return {goal, done: WOB_DONE_GLOBAL, raw: WOB_RAW_REWARD_GLOBAL, reason: WOB_REWARD_REASON};
}"""
OBSERVE_JS = f"args => ({{status: ({STATUS_JS})(), elements: ({ELEMENTS_JS})(args)}})"


class Browser:
    """One headless chromium process that many env slots share; `ensure()` relaunches it if it died."""

    def __init__(self, config: EnvConfig | None = None):
        self.config = config or EnvConfig()
        self._playwright = self._browser = None
        self.launches = 0
        self._lock = asyncio.Lock()

    async def ensure(self):
        async with self._lock:
            if self.alive:
                return self._browser
            if self._playwright is None:
                from playwright.async_api import async_playwright

                self._playwright = await async_playwright().start()
            self._browser = await self._playwright.chromium.launch(
                executable_path=self.config.chromium, headless=True, args=CHROMIUM_FLAGS)
            self.launches += 1
            return self._browser

    @property
    def alive(self) -> bool:
        return self._browser is not None and self._browser.is_connected()

    async def close(self):
        if self.alive:
            await self._browser.close()
        if self._playwright is not None:
            await self._playwright.stop()
        self._browser = self._playwright = None


class PageSlot:
    """One page of its own BrowserContext (separate contexts are not throttled like tabs of one window) that only
    reaches 127.0.0.1 and the current task's host (other requests are aborted before they leave the machine), and
    that is replaced after a crash, a hang or a forbidden navigation. 01_env.BrowserEnv runs episodes on it."""

    def __init__(self, browser: Browser, server_base: str, config: EnvConfig | None = None):
        self.browser, self.base = browser, server_base
        self.config = config or browser.config
        self._context = self._page = None
        self._crashed = False
        self._left_to: str | None = None  # where the agent tried to navigate off the allowed sites
        self.blocked: list[str] = []  # requests to forbidden origins, aborted before they left the machine
        self.task = None

    def _allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        if url == "about:blank" or parts.hostname == "127.0.0.1":
            return True
        task = urlsplit(urljoin(self.base, self.task.url)) if self.task else None
        return bool(task and parts.scheme in ("http", "https") and parts.hostname == task.hostname)

    async def _route(self, route):
        if self._allowed(route.request.url):
            await route.continue_()
        else:
            self.blocked.append(route.request.url)
            if route.request.is_navigation_request() and route.request.frame == self._page.main_frame:
                self._left_to = route.request.url  # the agent tried to leave: the episode ends after this step
            await route.abort("blockedbyclient")

    def _viewport(self) -> tuple[int, int]:
        return MINIWOB_VIEWPORT if self.task.judge == "miniwob" else self.config.viewport

    async def _new_page(self):
        await self._drop_page()
        browser = await self.browser.ensure()
        w, h = self._viewport()
        self._context = await browser.new_context(viewport={"width": w, "height": h})
        await self._context.route("**/*", self._route)
        self._page = await self._context.new_page()
        self._crashed = False
        self._page.on("crash", lambda _: setattr(self, "_crashed", True))

    async def _drop_page(self):
        if self._context is not None:
            try:
                await asyncio.wait_for(self._context.close(), 5)
            except Exception:  # a dead browser or a hung renderer: nothing left to close
                pass
        self._context = self._page = None

    async def close(self):
        await self._drop_page()

    def _usable(self) -> bool:
        return self._page is not None and not self._page.is_closed() and not self._crashed and self.browser.alive

    def _clip(self) -> tuple:
        return MINIWOB_AREA if self.task.judge == "miniwob" else (0, 0, *self._viewport())

    async def _open(self, url: str) -> None:
        """The page at `url` and this task's viewport: a new page only if the old one cannot be used."""
        if not self._usable():
            await self._new_page()
        w, h = self._viewport()
        if self._page.viewport_size != {"width": w, "height": h}:
            await self._page.set_viewport_size({"width": w, "height": h})
        if self._page.url != url:
            await self._page.goto(url)

    async def _read(self) -> tuple[dict, bytes]:
        """The page's state (OBSERVE_JS: task status, element marks) and a JPEG of the task area, in one round trip
        sent together: a screenshot waits for the next compositor frame (~30 ms here) and the DOM read runs inside
        that wait."""
        clip = self._clip()
        state, shot = await asyncio.gather(
            self._page.evaluate(OBSERVE_JS, [list(clip), self.config.max_elements]),
            self._page.screenshot(type="jpeg", quality=self.config.jpeg_quality,
                                  clip=dict(zip(("x", "y", "width", "height"), clip))), return_exceptions=True)
        for failed in (state, shot):  # wait for both before raising: no request is left running behind us
            if isinstance(failed, BaseException):
                raise failed
        return state, shot
