"""01 - The web as an environment.

A web agent sees a page and acts on it; the environment is a real headless browser (Playwright driving Debian's
chromium). This file defines, in reading order:

  Task / suites     what to do: MiniWoB++ pages served from 127.0.0.1, and WebGym's open-web task file format
  Action grammar    the small text language a model writes ("click(#3)"), with a strict parser (no eval, ever)
  ScreenshotStore   the one in-memory home of screenshot bytes; trajectories carry only small string keys
                    (the paper's "lightweight screenshot handling": references travel, pixels stay put)
  Browser/BrowserEnv  one chromium process shared by many episode slots; each slot has its own context + page
                    and exposes async reset(task, seed) / step(action) that never raise on a bad page

Run `python 01_env.py` for a demo (a scripted agent plays a few tasks) and `python 01_env.py --bench` for the
environment benchmark. Reward is trajectory-level success, 1 or 0, as in the paper.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

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

try:
    import miniwob

    MINIWOB_HTML = Path(miniwob.__file__).parent / "html"
except ImportError:  # the loader below says what to install
    MINIWOB_HTML = None

# Difficulty rule for MiniWoB++: the fewest actions a correct solution needs in our grammar.
# easy = one click or focus on an element the goal names; medium = 2-6 actions or typing a given string;
# hard = everything else (longer forms, dragging, drawing, timing, visual puzzles, search over pages).
EASY = {"click-button", "click-link", "click-dialog", "click-dialog-2", "click-test", "click-test-2",
        "click-test-transfer", "click-color", "click-shape", "click-widget", "click-tab", "focus-text",
        "focus-text-2", "button-delay", "identify-shape", "unicode-test", "grid-coordinate"}
MEDIUM = {"click-option", "click-button-sequence", "click-checkboxes", "click-checkboxes-large",
          "click-checkboxes-soft", "click-checkboxes-transfer", "click-collapsible", "click-collapsible-nodelay",
          "click-collapsible-2", "click-collapsible-2-nodelay", "click-tab-2", "click-tab-2-easy",
          "click-tab-2-medium", "click-menu", "click-pie", "click-pie-nodelay", "click-scroll-list",
          "click-shades", "choose-list", "enter-text", "enter-text-2", "enter-text-dynamic", "enter-password",
          "enter-date", "enter-time", "login-user", "login-user-popup", "navigate-tree", "sign-agreement",
          "simple-arithmetic", "simple-algebra", "odd-or-even", "find-word", "use-autocomplete",
          "use-autocomplete-nodelay", "email-inbox-delete", "email-inbox-important", "read-table",
          "read-table-2", "copy-paste", "copy-paste-2", "multi-layouts", "multi-orderings", "number-checkboxes",
          "text-transform", "guess-number", "social-media", "social-media-some", "search-engine", "phone-book"}
# Out-of-distribution test split: whole task families held out of training, siblings of trained ones so that
# transfer is possible, and every difficulty slice represented.
TEST_FAMILIES = {"click-widget", "click-color", "identify-shape", "unicode-test",  # easy
                 "enter-password", "click-option", "login-user-popup", "navigate-tree", "email-inbox-delete",
                 "find-word", "use-autocomplete", "simple-algebra",  # medium
                 "book-flight", "email-inbox-forward", "use-slider", "drag-items", "text-editor", "tic-tac-toe",
                 "count-shape"}  # hard


def task_family(name: str) -> str:
    """click-tab-2-hard -> click-tab: strip variant suffixes until none is left."""
    while True:
        base = re.sub(r"-(nodelay|easy|medium|hard|large|soft|transfer|nl|turk|noscroll|\d+)$", "", name)
        if base == name:
            return name
        name = base


def miniwob_tasks(split: str | None = None, names: list[str] | None = None) -> list[Task]:
    """The 130 MiniWoB++ pages the `miniwob` package ships, as Tasks (optionally one split or a few names)."""
    if MINIWOB_HTML is None:
        raise ImportError("MiniWoB++ pages not found: pip install miniwob")
    tasks = []
    for page in sorted((MINIWOB_HTML / "miniwob").glob("*.html")):
        name, family = page.stem, task_family(page.stem)
        diff = "easy" if name in EASY else "medium" if name in MEDIUM else "hard"
        task = Task(id=f"miniwob/{name}", url=f"miniwob/{page.name}", goal="", judge="miniwob", difficulty=diff,
                    split="test" if family in TEST_FAMILIES else "train", family=family, max_steps=HORIZON[diff])
        if (split is None or task.split == split) and (names is None or name in names):
            tasks.append(task)
    if names is not None and len(tasks) != len(set(names)):
        raise ValueError(f"unknown MiniWoB++ task(s): {sorted(set(names) - {t.id[8:] for t in tasks})}")
    return tasks


# WebGym task files (JSONL, one task per line, or a JSON list): open-web tasks judged against a rubric of
# "fact groups" ({"id", "description", "facts": [...]}). Difficulty = number of facts: <=3 easy, <=6 medium.
# Shapes accepted as the released loader accepts them: the rubric as a list of fact groups, of {"description"}
# items or of strings, or as one string (free text, or the JSON of such a list, as a table column stores it);
# difficulty by the released rule `int(d) if d else 5` (a string or a float is read, 0 or null mean 5).
class TaskFileError(ValueError):
    """A task file that cannot be used; the message names the file, the line and the field."""


def _difficulty(n_facts: int) -> str:
    return "easy" if n_facts <= 3 else "medium" if n_facts <= 6 else "hard"


def _rubric(ref) -> tuple:
    if isinstance(ref, str) and ref.lstrip().startswith(("[", "{")):
        try:
            ref = json.loads(ref)  # a rubric stored as its JSON text
        except (ValueError, RecursionError):
            pass  # free text that happens to start with a bracket
    if isinstance(ref, str):  # legacy: one free-text criterion
        ref = [ref]
    if isinstance(ref, dict):
        ref = [ref]
    if not isinstance(ref, list) or not ref:
        raise ValueError(f"field 'evaluator_reference': expected a non-empty list, got {ref!r:.60}")
    groups = []
    for group in ref:
        if isinstance(group, dict):
            facts = group["facts"] if "facts" in group else [group.get("description")]
        else:
            facts = [group]
        if not isinstance(facts, list) or not facts or not all(isinstance(f, str) and f.strip() for f in facts):
            raise ValueError(f"field 'evaluator_reference': bad fact group {group!r:.60}")
        groups.append(tuple(facts))
    return tuple(groups)


def _task_row(row, lineno: int, split: str, judge: str) -> Task:
    """One row of a task file as a Task; ValueError says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for name in ("task_name", "website"):
        if not isinstance(row.get(name), str) or not row[name].strip():
            raise ValueError(f"field {name!r}: expected a non-empty string, got {row.get(name)!r:.60}")
    if "evaluator_reference" not in row:
        raise ValueError("field 'evaluator_reference' is missing")
    rubric = _rubric(row["evaluator_reference"])
    d = row.get("difficulty")
    try:
        n_facts = int(d) if d else 5  # the released rule; WebGym's default for a task without one: medium
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"field 'difficulty': expected a number of facts, got {d!r:.60}") from None
    url = row["website"] if "://" in row["website"] else "https://" + row["website"]
    diff = _difficulty(n_facts)
    horizon = {"train": HORIZON, "test": {"easy": 30, "medium": 50, "hard": 70}}[split]
    task_id = row["task_id"] if row.get("task_id") not in (None, "") else lineno
    return Task(id=f"webgym/{task_id}", url=url, goal=row["task_name"], judge=judge,
                difficulty=diff, split=split, family=urlsplit(url).hostname or url, max_steps=horizon[diff],
                rubric=rubric)


def load_webgym_tasks(path: str | Path, split: str | None = None, judge: str = "rubric_keywords",
                      strict: bool = False, warn=None) -> list[Task]:
    """Read a WebGym task file. `split` defaults to "test" if the file name says so (test tasks are on
    websites never seen in training), else "train". `judge` names the rubric judge in JUDGES. A bad row is
    reported (`warn(message)`, default: a line on stderr) and skipped; `strict` makes it an error instead, and a
    file where no row loads is always one."""
    path = Path(path)
    split = split or ("test" if "test" in path.name else "train")
    warn = warn or (lambda message: print(message, file=sys.stderr))
    try:
        text = path.read_text()
        if text.lstrip().startswith("["):
            rows = list(enumerate(json.loads(text), 1))
        else:
            rows = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TaskFileError(f"{path}: cannot read tasks: {type(e).__name__}: {str(e)[:200]}") from None
    tasks, bad = [], 0
    for lineno, row in rows:
        try:
            if isinstance(row, str):
                row = json.loads(row)
            tasks.append(_task_row(row, lineno, split, judge))
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested deeper than Python's stack
            message = f"{path}:{lineno}: {e if isinstance(e, ValueError) else 'nested too deeply to read'}"
            if strict:
                raise TaskFileError(message) from None
            bad += 1
            warn(f"{message} (row skipped)")
    if not tasks:
        raise TaskFileError(f"{path}: no tasks in file" + (f" ({bad} bad rows)" if bad else ""))
    if bad:
        warn(f"{path}: {len(tasks)} tasks loaded, {bad} bad rows skipped")
    return tasks


def rubric_keywords_judge(task: Task, answer: str, screenshots: list[bytes]) -> float:
    """Deterministic stand-in for WebGym's LLM judge: every fact must appear in the answer (case-insensitive);
    a fact written "a OR b" needs one of its alternatives. Success is all-or-nothing, as in WebGym."""
    answer = answer.lower()
    facts = [f for group in task.rubric for f in group]
    return float(all(any(alt.strip().lower() in answer for alt in f.split(" OR ")) for f in facts))


# judge(task, answer, screenshots) -> reward in [0, 1]. The LLM judge of the paper is asyncwebrl.judge.ChatJudge
# (any OpenAI-compatible endpoint); 05_train.py registers it as "chat" for --judge chat.
JUDGES = {"rubric_keywords": rubric_keywords_judge}

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


# Visible, interactable or text-bearing elements of the task area, in document order, with their boxes.
_ELEMENTS_JS = """([clip, limit]) => {
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
_START_JS = """([seed]) => {
  if (seed !== null) { Math.seedrandom(seed); core.EPISODE_MAX_TIME = 1e9; core.startEpisodeReal(); }
  return window.navigation ? navigation.currentEntry.key : null;
}"""
_CAN_GO_BACK_JS = """first => {
  if (!window.navigation) return history.length > 1;
  const i = navigation.entries().findIndex(e => e.key === first);  // -1: the episode has moved to another origin
  return navigation.canGoBack && i < navigation.currentEntry.index;
}"""
_STATUS_JS = """() => {
  if (typeof core === 'undefined') return null;  // not a MiniWoB++ page
  let goal = core.getUtterance(); if (typeof goal !== 'string') goal = goal.utterance;
  return {goal, done: WOB_DONE_GLOBAL, raw: WOB_RAW_REWARD_GLOBAL, reason: WOB_REWARD_REASON};
}"""
_OBSERVE_JS = f"args => ({{status: ({_STATUS_JS})(), elements: ({_ELEMENTS_JS})(args)}})"


class EpisodeEnd(Exception):
    """Internal: the page can no longer be used for this episode (crash, hang, forbidden navigation)."""


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


class BrowserEnv:
    """One episode slot. Its own BrowserContext (separate contexts are not throttled like tabs of one window)
    and one page, reused across episodes of the same MiniWoB++ task (the page restarts itself) and replaced
    after a crash, a hang or a forbidden navigation. reset() and step() report every page failure as the end of
    the episode with a reason in info["end"]; they do not raise for anything a page or a model can do."""

    def __init__(self, browser: Browser, store: ScreenshotStore, server_base: str, config: EnvConfig | None = None):
        self.browser, self.store, self.base = browser, store, server_base
        self.config = config or browser.config
        self._context = self._page = None
        self._crashed = False
        self._left_to: str | None = None
        self.blocked: list[str] = []  # requests to forbidden origins, aborted before they left the machine
        self.task: Task | None = None
        self.episode = ""
        self.goal, self.t, self.done = "", 0, True
        self.last_obs: Observation | None = None
        self._answer: str | None = None  # set by an answer(...) action: the episode ends after this step
        self._first_entry: str | None = None  # the history entry the episode started on: go_back() stops there

    # -- lifecycle -------------------------------------------------------------------------------------------
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

    def _on_task_page(self) -> bool:
        """A MiniWoB++ reward is read from the page's own script: it counts only on this task's page."""
        task_url = urljoin(self.base, self.task.url)
        return self.task.judge != "miniwob" or urldefrag(self._page.url).url == task_url

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
        url = urljoin(self.base, task.url)
        if not self._usable():
            await self._new_page()
        w, h = self._viewport()
        if self._page.viewport_size != {"width": w, "height": h}:
            await self._page.set_viewport_size({"width": w, "height": h})
        if self._page.url != url:
            await self._page.goto(url)
        # a reused page keeps the history of earlier episodes (other tasks too): remember where this one starts
        self._first_entry = await self._page.evaluate(_START_JS, [seed if task.judge == "miniwob" else None])
        self.goal = task.goal
        self.last_obs, _ = await self._observe()
        return self.last_obs

    def _clip(self) -> tuple:
        return MINIWOB_AREA if self.task.judge == "miniwob" else (0, 0, *self._viewport())

    async def _observe(self, error: str | None = None) -> tuple[Observation, dict | None]:
        """The screenshot and one round trip for the task status and the element marks, sent together: a
        screenshot waits for the next compositor frame (~30 ms here) and the DOM read runs inside that wait."""
        clip = self._clip()
        state, shot = await asyncio.gather(
            self._page.evaluate(_OBSERVE_JS, [list(clip), self.config.max_elements]),
            self._page.screenshot(type="jpeg", quality=self.config.jpeg_quality,
                                  clip=dict(zip(("x", "y", "width", "height"), clip))), return_exceptions=True)
        for failed in (state, shot):  # wait for both before raising: no request is left running behind us
            if isinstance(failed, BaseException):
                raise failed
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
            if not await page.evaluate(_CAN_GO_BACK_JS, self._first_entry):
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
        if reason in ("timeout", "page_crashed", "blocked_navigation", "page_error", "browser_died"):
            await self._drop_page()  # never reuse a page that hung, crashed or left the allowed sites
        obs = self.last_obs or Observation(self.goal, "", None)  # after a crash: the last good observation
        return StepResult(dataclasses.replace(obs, step=self.t), reward or 0.0, True, info)


# ----------------------------------------------------------------------------------------------------------------
# Demo: `python 01_env.py` lets the scripted agent (and a random one) play a few tasks and saves a strip of
# screenshots; `python 01_env.py --bench` measures the environment (see asyncwebrl/env_bench.py).

DEMO_TASKS = ["click-button", "enter-text", "login-user", "click-checkboxes", "click-tab"]


async def demo(task_names: list[str], episodes: int, out: Path, seed: int = 0) -> list[dict]:
    import random

    from PIL import Image

    from asyncwebrl.oracle import oracle_action, random_action

    rows, strip = [], []
    with TaskServer() as server:
        browser, store = Browser(), ScreenshotStore()
        env = BrowserEnv(browser, store, server.base)
        try:
            for name in task_names:
                task = miniwob_tasks(names=[name])[0]
                for agent in ("oracle", "random"):
                    rng = random.Random(seed)
                    for ep in range(episodes):
                        obs = await env.reset(task, seed=seed + ep, episode=f"{name}-{agent}-{ep}")
                        actions, result = [], None
                        while result is None or not result.done:
                            a = (oracle_action(name, obs) if agent == "oracle" else None) or random_action(obs, rng)
                            actions.append(str(a))
                            result = await env.step(a)
                            obs = result.obs
                        shots = [store.get(k) for k in store.keys(env.episode)]
                        if agent == "oracle" and ep == 0:
                            strip += shots
                        store.free(env.episode)
                        rows.append(dict(task=name, agent=agent, goal=env.goal, steps=env.t, actions=actions,
                                         reward=result.reward, end=result.info["end"]))
                        print(f"{name:18s} {agent:6s} reward={result.reward:.0f} steps={env.t:2d} "
                              f"end={result.info['end']:10s} goal={env.goal!r}\n{'':26s}actions: {' ; '.join(actions)}")
        finally:
            await env.close()
            await browser.close()
    import io

    images = [Image.open(io.BytesIO(b)) for b in strip]
    if images:
        canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
        for n, img in enumerate(images):
            canvas.paste(img, (sum(i.width for i in images[:n]), 0))
        out.mkdir(parents=True, exist_ok=True)
        canvas.save(out / "env_demo.png")
        print(f"saved {len(images)} screenshots of the scripted agent to {out / 'env_demo.png'}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="01_env: a scripted and a random agent play MiniWoB++ tasks "
                                                 "in headless chromium (demo), or --bench for the env benchmark.")
    parser.add_argument("--bench", action="store_true",
                        help="measure step latency vs bare Playwright, screenshot bytes vs PNG, and episodes/s "
                             "with 1, 4 and 8 concurrent pages; writes figures/env_bench.json")
    parser.add_argument("--tasks", nargs="+", default=DEMO_TASKS, metavar="NAME",
                        help=f"MiniWoB++ task names for the demo (default: {' '.join(DEMO_TASKS)})")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per task and agent (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (default: 0)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "figures",
                        help="where the screenshot strip / benchmark JSON go (default: figures/)")
    args = parser.parse_args(argv)
    if args.bench:
        from asyncwebrl.env_bench import run_benchmark

        asyncio.run(run_benchmark(args.out / "env_bench.json"))
    else:
        try:
            miniwob_tasks(names=args.tasks)
        except ValueError as e:
            parser.error(str(e))
        asyncio.run(demo(args.tasks, args.episodes, args.out, args.seed))


if __name__ == "__main__":
    main()
