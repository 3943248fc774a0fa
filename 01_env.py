"""01 - The web as an environment.

A web agent sees a page and acts on it; the environment is a real headless browser (Playwright driving Debian's
chromium). This file defines, in reading order:

  Task              what to do: a start page, a goal, who judges success, a horizon k
  Action grammar    the small text language a model writes ("click(#3)"), with a strict parser (no eval, ever)
  ScreenshotStore   the one in-memory home of screenshot bytes; trajectories carry only small string keys
                    (the paper's "lightweight screenshot handling": references travel, pixels stay put)
  BrowserEnv        one episode slot: async reset(task, seed) / step(action), which never raise on a bad page

Run `python 01_env.py` for a demo: a scripted agent and a random one play a few MiniWoB++ tasks, and a strip of
the scripted agent's screenshots is saved to figures/env_demo.png.

Reward is trajectory-level success, 1 or 0, as in the paper. Changed from the paper: the observation lists the
page's element marks beside the screenshot (a text channel the tiny CPU model can use; the paper's agent reads
pixels and clicks coordinates, which the grammar also allows), and MiniWoB++ pages are screenshotted in their
160x210 task area only. The machinery lives in the package: the task suites and the WebGym loader
(asyncwebrl/suites.py), the judges (asyncwebrl/judge.py), and the task server, chromium, its settings (EnvConfig)
and the page-reading JavaScript (asyncwebrl/browser.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from urllib.parse import urldefrag, urljoin

from asyncwebrl.browser import CAN_GO_BACK_JS, START_JS, Browser, EnvConfig, PageSlot, TaskServer
from asyncwebrl.judge import JUDGES

# ----------------------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class Task:
    id: str  # "miniwob/click-button", "webgym/<task_id>"
    url: str  # start page: relative to the local task server, or absolute for the open web
    goal: str  # instruction; MiniWoB pages generate it per seed, so the page's text replaces this at reset
    judge: str  # "miniwob" (the page's own JavaScript reward) or a name in JUDGES
    difficulty: str  # easy | medium | hard
    split: str  # train | test
    family: str  # task type; the test split holds families never seen in training
    max_steps: int = 10  # horizon k of this task
    rubric: tuple = ()  # WebGym fact groups: ((fact, fact, ...), ...)


HORIZON = {"easy": 10, "medium": 20, "hard": 30}  # paper's training horizons; k = 10 is the Easy one
# MiniWoB++ pages draw each instance from a seed. Training draws seeds below TRAIN_SEEDS; evaluation uses seeds from
# TRAIN_SEEDS upward, so "held-out episodes" of a training task are instances never trained on.
TRAIN_SEEDS = 2**30

# ----------------------------------------------------------------------------------------------------------------
# The action grammar. One action per step, written as text by the model:
#   click(#3)            click the centre of the element marked [3] in the observation
#   click(412, 250)      click at (x, y) in screenshot coordinates normalised to 0..1000 (as the paper's agent)
#   type(#3, "hello")    click element [3], select its content, type "hello" over it
#   type("hello")        type into the element that has focus
#   press("Enter")       press one key (KEYS)
#   scroll(down)         scroll the page by one screen, up or down
#   go_back()            the browser's back button
#   answer("text")       end the episode with an answer (the judge reads it; MiniWoB++ just stops)
# Strings are JSON strings (so \" and \n work) of at most MAX_TEXT characters.

KEYS = {"Enter", "Tab", "Backspace", "Delete", "Escape", "ArrowUp", "ArrowDown", "ArrowLeft", "ArrowRight",
        "Home", "End", "PageUp", "PageDown", "Space"}
MAX_TEXT = 200


@dataclass(frozen=True)
class Action:
    kind: str  # click | type | press | scroll | go_back | answer
    mark: int | None = None
    x: int | None = None
    y: int | None = None
    text: str | None = None  # typed text, key name, scroll direction or answer

    def __str__(self) -> str:  # the canonical text form: parse_action(str(a)) == a
        q = json.dumps(self.text, ensure_ascii=False) if self.text is not None else ""
        if self.kind == "click":
            return f"click(#{self.mark})" if self.mark is not None else f"click({self.x}, {self.y})"
        if self.kind == "type":
            return f"type(#{self.mark}, {q})" if self.mark is not None else f"type({q})"
        if self.kind == "scroll":
            return f"scroll({self.text})"
        return "go_back()" if self.kind == "go_back" else f"{self.kind}({q})"


class ActionParseError(ValueError):
    """Model text that is not exactly one action of the grammar. `kind` says what went wrong."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # empty | syntax | unknown_action | bad_arguments | out_of_range


_CALL = re.compile(r"\s*([a-z_]+)\s*\((.*)\)\s*", re.DOTALL)
_ARG = re.compile(r'\s*(?:#([0-9]+)|(-?[0-9]+)|("(?:[^"\\\n]|\\.)*")|([a-z]+))\s*(,|$)', re.DOTALL)
MAX_DIGITS = 6  # a mark or a coordinate has at most this many digits (int() of thousands of digits raises)
_SIGNATURES = {"click": ["m", "ii"], "type": ["ms", "s"], "press": ["s"], "scroll": ["w"], "go_back": [""],
               "answer": ["s"]}


def parse_action(text: str) -> Action:
    """Strictly parse one action; raise ActionParseError on anything else. Never evaluates model text."""
    if not text or not text.strip():
        raise ActionParseError("empty", "empty action")
    call = _CALL.fullmatch(text)
    if call is None:
        raise ActionParseError("syntax", f"not of the form name(args): {text[:80]!r}")
    name, rest = call.groups()
    if name not in _SIGNATURES:
        raise ActionParseError("unknown_action", f"unknown action {name!r}; expected one of {sorted(_SIGNATURES)}")
    args, sig, pos = [], "", 0
    while pos < len(rest) and rest[pos:].strip():
        m = _ARG.match(rest, pos)
        if m is None:
            raise ActionParseError("syntax", f"cannot read the arguments of {name}: {rest[:80]!r}")
        mark, num, string, word, sep = m.groups()
        if len((mark or num or "").lstrip("-")) > MAX_DIGITS:
            raise ActionParseError("out_of_range", f"a number of more than {MAX_DIGITS} digits in {name}(...)")
        if string is not None:
            string = _json_string(string)
        args.append(int(mark) if mark else int(num) if num else string if string is not None else word)
        sig += "m" if mark else "i" if num else "s" if string is not None else "w"
        pos = m.end()
        if not sep and pos < len(rest):
            raise ActionParseError("syntax", f"missing comma in {name}(...)")
        if sep and not rest[pos:].strip():
            raise ActionParseError("syntax", f"trailing comma in {name}(...)")
    if sig not in _SIGNATURES[name]:
        raise ActionParseError("bad_arguments", f"{name} takes ({' or '.join(_SIGNATURES[name]) or 'nothing'}) "
                                                f"(m=#mark, i=int, s=\"string\", w=word), got ({sig})")
    return _checked(name, sig, args)


def _json_string(literal: str) -> str:
    """A JSON string literal (safe, no evaluation); a bad escape, a raw control character or a lone surrogate
    (which no browser can type) is the model's error, not ours."""
    try:
        text = json.loads(literal)
    except ValueError as e:
        raise ActionParseError("bad_arguments", f"not a valid JSON string ({e.msg}): {literal[:40]!r}") from None
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise ActionParseError("bad_arguments", "a string with a lone surrogate (\\ud800-\\udfff)")
    return text


def _checked(name: str, sig: str, args: list) -> Action:
    if name == "click" and sig == "ii":
        if not all(0 <= v <= 1000 for v in args):
            raise ActionParseError("out_of_range", f"click coordinates must be in 0..1000, got {args}")
        return Action("click", x=args[0], y=args[1])
    if name == "scroll" and args[0] not in ("up", "down"):
        raise ActionParseError("out_of_range", f"scroll direction must be up or down, got {args[0]!r}")
    if name == "press" and args[0] not in KEYS:
        raise ActionParseError("out_of_range", f"unknown key {args[0]!r}; keys: {sorted(KEYS)}")
    text = args[-1] if sig and sig[-1] in "sw" else None
    if text is not None and len(text) > MAX_TEXT:
        raise ActionParseError("out_of_range", f"text longer than {MAX_TEXT} characters")
    return Action(name, mark=args[0] if sig.startswith("m") else None, text=text)


# ----------------------------------------------------------------------------------------------------------------
# Screenshots live here, once. Observations and trajectories hold keys ("<episode>:<n>"); the trainer fetches the
# bytes when it builds a batch and frees an episode's keys when its trajectory is consumed or dropped.


class ScreenshotStore:
    def __init__(self):
        self._bytes: dict[str, bytes] = {}
        self._episodes: dict[str, dict[bytes, str]] = {}  # episode -> sha1 -> key: an unchanged page is stored once
        self._lock = threading.Lock()  # the rollout thread writes while the trainer thread reads and frees

    def put(self, episode: str, data: bytes) -> str:
        digest = hashlib.sha1(data).digest()
        with self._lock:
            keys = self._episodes.setdefault(episode, {})
            if digest not in keys:
                keys[digest] = f"{episode}:{len(keys)}"
                self._bytes[keys[digest]] = data
            return keys[digest]

    def get(self, key: str) -> bytes:
        with self._lock:
            return self._bytes[key]

    def keys(self, episode: str) -> list[str]:
        with self._lock:
            return list(self._episodes.get(episode, {}).values())

    def free(self, episode: str) -> int:
        """Drop every screenshot of one episode; returns the bytes freed."""
        with self._lock:
            return sum(len(self._bytes.pop(key)) for key in self._episodes.pop(episode, {}).values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(map(len, self._bytes.values()))

    def __len__(self) -> int:
        return len(self._bytes)


# ----------------------------------------------------------------------------------------------------------------
# The environment


@dataclass(frozen=True)
class Element:
    mark: int
    tag: str  # button, a, input[text], input[checkbox], select, textarea, label, span, ...
    text: str
    box: tuple[float, float, float, float]  # x, y, width, height in CSS pixels
    value: str | None = None  # text inputs: current value; checkboxes and radios: "checked"/"unchecked"

    def __str__(self) -> str:
        value = f" value={json.dumps(self.value)}" if self.value is not None else ""
        return f"[{self.mark}] {self.tag} {json.dumps(self.text[:40])}{value}"


@dataclass
class Observation:
    goal: str
    url: str
    screenshot: str | None  # a key into the ScreenshotStore, never the bytes
    elements: tuple[Element, ...] = ()
    step: int = 0
    error: str | None = None  # why the previous action did nothing (a parse error, an unknown mark, ...)

    @property
    def elements_text(self) -> str:
        return "\n".join(map(str, self.elements))


@dataclass
class StepResult:
    obs: Observation
    reward: float  # 1.0 for success, else 0.0; given once, when done
    done: bool
    info: dict = field(default_factory=dict)  # end reason, raw page reward, parse errors ...


# Why an episode ended (info["end"]). The agent's doing: it finished the task, answered, ran out of steps, or chose
# an action that left the task's sites; these are rewards. The environment's or the judge's (a step that hung, a
# crashed renderer, a page error, a dead browser, a judge that failed): not the agent's, so 04 never trains them.
AGENT_ENDS = frozenset({"task_done", "answer", "max_steps", "blocked_navigation"})
FAULT_ENDS = frozenset({"timeout", "page_crashed", "page_error", "browser_died", "judge_error"})


class EpisodeEnd(Exception):
    """Internal: the page can no longer be used for this episode (crash, hang, forbidden navigation)."""


class BrowserEnv(PageSlot):
    """One episode slot. Its own BrowserContext (separate contexts are not throttled like tabs of one window)
    and one page, reused across episodes of the same MiniWoB++ task (the page restarts itself) and replaced
    after a crash, a hang or a forbidden navigation. reset() and step() report every page failure as the end of
    the episode with a reason in info["end"]; they do not raise for anything a page or a model can do."""

    def __init__(self, browser: Browser, store: ScreenshotStore, server_base: str, config: EnvConfig | None = None):
        super().__init__(browser, server_base, config)
        self.store = store
        self.episode = ""
        self.goal, self.t, self.done = "", 0, True
        self.last_obs: Observation | None = None
        self._answer: str | None = None  # set by an answer(...) action: the episode ends after this step
        self._first_entry: str | None = None  # the history entry the episode started on: go_back() stops there

    def _on_task_page(self) -> bool:
        """A MiniWoB++ reward is read from the page's own script: it counts only on this task's page."""
        task_url = urljoin(self.base, self.task.url)
        return self.task.judge != "miniwob" or urldefrag(self._page.url).url == task_url

    # -- episode ---------------------------------------------------------------------------------------------
    async def reset(self, task: Task, seed: int, episode: str | None = None) -> Observation:
        """Start an episode of `task` (seeded); returns the first observation. A page that cannot be opened
        twice in a row raises RuntimeError: that is a broken task or browser, not an agent's mistake."""
        self.task, self.t, self.done, self._answer, self._left_to = task, 0, False, None, None
        self.episode = episode or f"{task.id}#{seed}:{id(self):x}"
        for attempt in range(2):
            try:
                return await asyncio.wait_for(self._start(task, seed), self.config.step_timeout_s * 2)
            except Exception as e:  # crash, hang, dead browser: a fresh page, then one more try
                await self._drop_page()
                if attempt:
                    raise RuntimeError(f"cannot start {task.id}: {type(e).__name__}: {e}") from e

    async def _start(self, task: Task, seed: int) -> Observation:
        await self._open(urljoin(self.base, task.url))  # the page, reused if it is usable (asyncwebrl/browser.py)
        # a reused page keeps the history of earlier episodes (other tasks too): remember where this one starts
        self._first_entry = await self._page.evaluate(START_JS, [seed if task.judge == "miniwob" else None])
        self.goal = task.goal
        self.last_obs, _ = await self._observe()
        return self.last_obs

    async def _observe(self, error: str | None = None) -> tuple[Observation, dict | None]:
        """The screenshot (JPEG bytes, into the store) with the task status and the element marks, read together."""
        state, shot = await self._read()
        status = state["status"] if self.task.judge == "miniwob" else None
        if status:
            self.goal = status["goal"]
        elements = tuple(Element(mark=i, tag=e["tag"], text=e["text"], box=tuple(e["box"]), value=e["value"])
                         for i, e in enumerate(state["elements"]))
        obs = Observation(goal=self.goal, url=self._page.url, screenshot=self.store.put(self.episode, shot),
                          elements=elements, step=self.t, error=error)
        return obs, status

    async def step(self, action: Action | str) -> StepResult:
        """Apply one action (an Action or the model's raw text). A malformed action costs a step and is
        reported in obs.error; a dead or forbidden page ends the episode with info["end"] saying why."""
        if self.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        self.t += 1
        info: dict = {}
        if isinstance(action, str):
            try:
                action = parse_action(action)
            except ActionParseError as e:
                action, info["parse_error"] = None, e.kind
                error = f"invalid action ({e.kind}): {e}"
        try:
            if action is not None:
                error = await asyncio.wait_for(self._act(action), self.config.step_timeout_s)
            return await asyncio.wait_for(self._after(error, info), self.config.step_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            return await self._end("timeout", info)
        except EpisodeEnd as e:
            return await self._end(str(e), info)
        except Exception as e:  # Playwright errors: the page or the browser is gone
            info["error"] = f"{type(e).__name__}: {e}"[:300]
            reason = ("blocked_navigation" if self._left_to else "browser_died" if not self.browser.alive else
                      "page_crashed" if self._crashed or self._page is None or self._page.is_closed() else "page_error")
            return await self._end(reason, info)

    async def _act(self, a: Action) -> str | None:
        """Perform the action; return an error string when it names something that is not there."""
        page, obs = self._page, self.last_obs
        if a.mark is not None and a.mark >= len(obs.elements):
            return f"no element [{a.mark}] on the page (marks 0..{len(obs.elements) - 1})"
        if a.kind == "click" or (a.kind == "type" and a.mark is not None):
            if a.mark is not None:
                x, y, w, h = obs.elements[a.mark].box
                px, py = x + w / 2, y + h / 2
            else:  # 0..1000 over the screenshot, as x_px = W * x / 1000 in the paper
                cx, cy, cw, ch = self._clip()
                px, py = cx + cw * a.x / 1000, cy + ch * a.y / 1000
            await page.mouse.click(px, py)
        if a.kind == "type":
            if a.mark is not None:
                await page.keyboard.press("ControlOrMeta+a")  # replace the field's content, as a user would
            await page.keyboard.type(a.text)
        elif a.kind == "press":
            await page.keyboard.press(" " if a.text == "Space" else a.text)
        elif a.kind == "scroll":
            await page.mouse.wheel(0, self._clip()[3] * (1 if a.text == "down" else -1))
        elif a.kind == "go_back":  # never past the episode's first page: that would be another episode's page
            if not await page.evaluate(CAN_GO_BACK_JS, self._first_entry):
                return "no earlier page in this episode"
            await page.go_back()
        elif a.kind == "answer":
            self._answer = a.text
        return None

    async def _after(self, error: str | None, info: dict) -> StepResult:
        if self._crashed:
            raise EpisodeEnd("page_crashed")
        try:
            self.last_obs, status = await self._observe(error)
        except Exception:  # the action started a navigation that raced the screenshot: let it land, then retry
            if self._crashed or self._left_to:
                raise
            await self._page.wait_for_load_state()
            self.last_obs, status = await self._observe(error)
        if self._left_to or not self._allowed(self._page.url) or not self._on_task_page():
            raise EpisodeEnd("blocked_navigation")
        if status is not None:
            info["raw_reward"] = status["raw"]
            if status["done"]:  # success iff the page's raw reward is positive (it is in -1..1)
                return await self._end("task_done", info, reward=float(status["raw"] > 0))
        if self._answer is not None:
            return await self._end("answer", info)
        if self.t >= self.task.max_steps:
            return await self._end("max_steps", info)
        return StepResult(self.last_obs, 0.0, False, info)

    async def _end(self, reason: str, info: dict, reward: float | None = None) -> StepResult:
        self.done = True
        info["end"] = reason
        if reward is None and reason == "answer" and self.task.judge != "miniwob":
            shots = [self.store.get(k) for k in self.store.keys(self.episode)]
            try:  # a model judge takes seconds: off the event loop, so the other pages keep stepping
                reward = float(await asyncio.to_thread(JUDGES[self.task.judge], self.task, self._answer, shots))
            except Exception as e:  # an unreachable or babbling judge fails this episode, not the run
                info.update(end="judge_error", judge_error=f"{type(e).__name__}: {e}")
        if reason in FAULT_ENDS or reason == "blocked_navigation":
            await self._drop_page()  # never reuse a page that hung, crashed or left the allowed sites
        obs = self.last_obs or Observation(self.goal, "", None)  # after a crash: the last good observation
        return StepResult(dataclasses.replace(obs, step=self.t), reward or 0.0, True, info)


class BrowserEnvs:
    """N episode slots that share one task server and one chromium (04's pool asks for them; tests pass fakes with
    the same three methods)."""

    def __init__(self, store, config=None):
        self.store, self.config = store, config

    async def start(self):
        self.server = TaskServer()
        self.browser = Browser(self.config)

    def slot(self, i: int):
        return BrowserEnv(self.browser, self.store, self.server.base, self.config)

    async def close(self):
        await self.browser.close()
        self.server.close()


# ----------------------------------------------------------------------------------------------------------------
# Demo: `python 01_env.py` (asyncwebrl/oracle.py: the scripted solvers read the same observation a model gets).

def main(argv=None):
    from asyncwebrl.oracle import main as demo  # the scripted solvers and the screenshot strip live there

    demo(argv)


if __name__ == "__main__":
    main()
