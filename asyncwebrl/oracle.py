"""Scripted MiniWoB++ solvers that act through the same grammar and observation a model gets.

They read the goal and the element marks (never the page's hidden state), so they are an honest ceiling for
evaluation, a check that the grammar can solve the tasks, and a source of demonstrations for warm-starting.
`oracle_action(task_name, obs)` returns the next Action, or None when it has no solver for that task. `demo` is
what `python 01_env.py` runs.
"""
from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

from asyncwebrl import load
from asyncwebrl.browser import Browser, TaskServer

env_mod = env = load("01_env")
Action = env.Action

ORDINALS = {"1st": 0, "2nd": 1, "3rd": 2, "4th": 3, "5th": 4}


def _quoted(goal: str) -> list[str]:
    return re.findall(r'"([^"]*)"', goal)


def _find(obs, text: str | None = None, tag: str | None = None, nth: int = 0):
    hits = [e for e in obs.elements
            if (text is None or e.text.strip() == text) and (tag is None or e.tag.startswith(tag))]
    return hits[nth] if len(hits) > nth else None


def _click(el) -> Action | None:
    return Action("click", mark=el.mark) if el is not None else None


def _fill(obs, fields: list[tuple[str, int, str]], submit: str) -> Action | None:
    """Type into each (tag, index, text) field whose value differs, then click the button named `submit`."""
    for tag, nth, text in fields:
        el = _find(obs, tag=tag, nth=nth)
        if el is not None and el.value != text:
            return Action("type", mark=el.mark, text=text)
    return _click(next((e for e in obs.elements if e.tag == "button" and e.text.lower() == submit.lower()), None))


def _checkboxes(obs, tag: str) -> Action | None:
    goal = obs.goal
    wanted = [] if "nothing" in goal else [w.strip() for w in
                                           re.split(r",|\band\b", goal[goal.index(" ") + 1:goal.index(" and click")])]
    for el in obs.elements:
        if el.tag == tag and (el.text in wanted) != (el.value == "checked"):
            return _click(el)
    return _click(_find(obs, "Submit", "button"))


def oracle_action(task_name: str, obs) -> Action | None:
    goal, q = obs.goal, _quoted(obs.goal)
    if task_name in ("click-button", "click-dialog-2"):  # the dialog's "x" is a button whose text is "Close"
        return _click(_find(obs, "Close" if q[0] == "x" else q[0], "button"))
    if task_name == "click-link":
        return _click(_find(obs, q[0]))
    if task_name == "click-dialog":
        return _click(_find(obs, "Close", "button"))
    if task_name == "click-test":
        return _click(_find(obs, tag="button"))
    if task_name == "click-test-2":
        return _click(_find(obs, re.search(r"button (\w+)", goal).group(1), "button"))
    if task_name == "click-tab":
        return _click(_find(obs, re.search(r"(Tab #\d+)", goal).group(1)))
    if task_name == "focus-text":
        return _click(_find(obs, tag="input"))
    if task_name == "focus-text-2":
        return _click(_find(obs, tag="input", nth=ORDINALS[re.search(r"(\d\w\w) input", goal).group(1)]))
    if task_name == "click-button-sequence":
        return _click(_find(obs, "ONE" if obs.step == 0 else "TWO", "button"))
    if task_name == "click-collapsible":
        return _click(_find(obs, tag="h3") if obs.step == 0 else _find(obs, "Submit", "button"))
    if task_name == "enter-text":
        return _fill(obs, [("input", 0, q[0])], "Submit")
    if task_name == "enter-text-2":
        text = q[0].lower() if "lower" in goal else q[0].upper()
        return _fill(obs, [("input", 0, text)], "Submit")
    if task_name == "enter-password":
        return _fill(obs, [("input[password]", 0, q[0]), ("input[password]", 1, q[0])], "Submit")
    if task_name == "login-user":
        return _fill(obs, [("input[text]", 0, q[0]), ("input[password]", 0, q[1])], "Login")
    if task_name == "click-checkboxes":
        return _checkboxes(obs, "input[checkbox]")
    if task_name == "click-option":
        return _checkboxes(obs, "input[radio]")
    return None


SOLVABLE = ("click-button", "click-dialog-2", "click-link", "click-dialog", "click-test", "click-test-2",
            "click-tab", "focus-text", "focus-text-2", "click-button-sequence", "click-collapsible", "enter-text",
            "enter-text-2", "enter-password", "login-user", "click-checkboxes", "click-option")


def random_action(obs, rng: random.Random) -> Action:
    """A uniformly random action over the element marks (the floor every evaluation table shows)."""
    if obs.elements and rng.random() < 0.8:
        el = rng.choice(obs.elements)
        if el.tag.startswith(("input[text]", "input[password]", "textarea")) and rng.random() < 0.5:
            return Action("type", mark=el.mark, text=rng.choice(["a", "hello", "42"]))
        return Action("click", mark=el.mark)
    return Action("click", x=rng.randrange(1001), y=rng.randrange(1001))


async def demo(task_names: list[str], episodes: int, out: Path, seed: int = 0) -> list[dict]:
    """`python 01_env.py`: the scripted and a random agent play each task; a strip of the scripted agent's
    screenshots is saved to out/env_demo.png."""
    from asyncwebrl.suites import miniwob_tasks

    rows, strip = [], []
    with TaskServer() as server:
        browser, store = Browser(), env_mod.ScreenshotStore()
        env = env_mod.BrowserEnv(browser, store, server.base)
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
                        if agent == "oracle" and ep == 0:
                            strip += [store.get(k) for k in store.keys(env.episode)]
                        store.free(env.episode)
                        rows.append(dict(task=name, agent=agent, goal=env.goal, steps=env.t, actions=actions,
                                         reward=result.reward, end=result.info["end"]))
                        print(f"{name:18s} {agent:6s} reward={result.reward:.0f} steps={env.t:2d} end="
                              f"{result.info['end']:10s} goal={env.goal!r}\n{'':26s}actions: {' ; '.join(actions)}")
        finally:
            await env.close()
            await browser.close()
    if strip:
        save_strip(strip, out / "env_demo.png")
    return rows


def save_strip(shots: list[bytes], path: Path) -> None:
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(b)) for b in shots]
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    for n, img in enumerate(images):
        canvas.paste(img, (sum(i.width for i in images[:n]), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"saved {len(images)} screenshots of the scripted agent to {path}")


DEMO_TASKS = ["click-button", "enter-text", "login-user", "click-checkboxes", "click-tab"]


def main(argv=None):
    """`python 01_env.py`'s command line."""
    import argparse

    from asyncwebrl.suites import miniwob_tasks

    parser = argparse.ArgumentParser(prog="01_env.py", description="01_env: a scripted and a random agent play "
                                     "MiniWoB++ tasks in headless chromium. The environment benchmark is "
                                     "`python -m experiments.env_bench`.")
    parser.add_argument("--tasks", nargs="+", default=DEMO_TASKS, metavar="NAME",
                        help=f"MiniWoB++ task names (default: {' '.join(DEMO_TASKS)})")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per task and agent (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (default: 0)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "figures",
                        help="where the screenshot strip goes (default: figures/)")
    args = parser.parse_args(argv)
    try:
        miniwob_tasks(names=args.tasks)
    except ValueError as e:
        parser.error(str(e))
    asyncio.run(demo(args.tasks, args.episodes, args.out, args.seed))
