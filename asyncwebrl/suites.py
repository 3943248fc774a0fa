"""The task suites: MiniWoB++'s 130 pages as Tasks (difficulty slices and the held-out test families), and
WebGym's open-web task files (JSONL or a JSON list) read the way the released loader reads them, bad rows
reported with their line and skipped. 01_env.py defines the Task these return; 05_train.py and 06_eval.py
choose the tasks with `miniwob_tasks` and `load_webgym_tasks`.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

from asyncwebrl import load
from asyncwebrl.browser import MINIWOB_HTML

env = load("01_env")
Task, HORIZON = env.Task, env.HORIZON

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

