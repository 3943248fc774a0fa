"""BrowserEnv against real headless chromium: every MiniWoB++ page, scripted solutions, and injected faults."""
import asyncio
import json

import pytest

from asyncwebrl import load, suites
from asyncwebrl.oracle import oracle_action

env = load("01_env")
pytestmark = pytest.mark.browser


async def play(slot, task, seed, policy):
    obs = await slot.reset(task, seed)
    while True:
        result = await slot.step(policy(obs))
        if result.done:
            return result
        obs = result.obs


@pytest.mark.slow
def test_every_miniwob_task_loads_gives_a_goal_and_accepts_actions(browser_env):
    tasks = suites.miniwob_tasks()

    async def body(first, store, server):
        slots = [first] + [env.BrowserEnv(first.browser, store, server.base) for _ in range(2)]
        report = {}

        async def worker(k):
            for task in tasks[k::3]:
                obs = await slots[k].reset(task, seed=1)
                result = await slots[k].step("click(500, 500)")
                report[task.id] = (obs.goal, obs.screenshot, result)

        try:
            await asyncio.gather(*(worker(k) for k in range(3)))
        finally:
            await asyncio.gather(*(s.close() for s in slots))
        return report

    report = browser_env(body)
    assert len(report) == 130
    for task_id, (goal, shot, result) in report.items():
        assert isinstance(goal, str) and goal.strip(), task_id
        assert shot is not None, task_id
        assert result.info.get("end") in (None, "task_done"), (task_id, result.info)
        assert "raw_reward" in result.info, task_id


SOLVED = ["click-button", "click-link", "click-dialog", "focus-text-2", "click-tab", "enter-text", "login-user",
          "click-checkboxes", "click-option", "click-button-sequence", "enter-password"]


def test_scripted_solutions_reach_reward_one(browser_env):
    async def body(slot, store, server):
        results = {}
        for name in SOLVED:
            task = suites.miniwob_tasks(names=[name])[0]
            results[name] = [await play(slot, task, seed, lambda o: oracle_action(name, o)) for seed in (0, 1)]
            store.free(slot.episode)
        return results

    results = browser_env(body)
    for name, runs in results.items():
        for r in runs:
            assert r.reward == 1.0 and r.info["end"] == "task_done" and r.info["raw_reward"] > 0, (name, r.info)
    steps = {name: runs[0].obs.step for name, runs in results.items()}
    assert steps["click-button"] == 1 and steps["login-user"] == 3  # one click; two fields + login


def test_wrong_action_gives_no_reward(browser_env):
    async def body(slot, store, server):
        task = suites.miniwob_tasks(names=["click-button"])[0]
        obs = await slot.reset(task, seed=3)
        target = oracle_action("click-button", obs).mark
        wrong = next(e for e in obs.elements if e.tag == "button" and e.text != obs.elements[target].text)
        return await slot.step(env.Action("click", mark=wrong.mark))

    result = browser_env(body)
    assert result.done and result.reward == 0.0 and result.info["raw_reward"] <= 0


def test_malformed_response_costs_a_step_and_is_reported(browser_env):
    async def body(slot, store, server):
        task = suites.miniwob_tasks(names=["enter-text"])[0]
        await slot.reset(task, seed=0)
        bad = await slot.step("Memory: I should type.\nAction: typ(#0)")
        unknown_mark = await slot.step("click(#17)")
        good = await slot.step(oracle_action("enter-text", unknown_mark.obs))
        return bad, unknown_mark, good

    bad, unknown_mark, good = browser_env(body)
    assert not bad.done and bad.obs.step == 1 and bad.info["parse_error"] == "syntax"
    assert bad.obs.error.startswith("invalid action (syntax)")
    assert not unknown_mark.done and "no element [17]" in unknown_mark.obs.error
    assert not good.done and good.obs.error is None and good.obs.elements[0].value  # typed into the field


def test_episode_ends_at_the_horizon(browser_env):
    import dataclasses

    async def body(slot, store, server):
        task = dataclasses.replace(suites.miniwob_tasks(names=["click-checkboxes"])[0], max_steps=3)
        await slot.reset(task, seed=0)
        return [await slot.step("scroll(down)") for _ in range(3)]

    results = browser_env(body)
    assert [r.done for r in results] == [False, False, True]
    assert results[-1].info["end"] == "max_steps" and results[-1].reward == 0.0


def test_crashed_page_ends_the_episode_and_the_next_reset_recovers(browser_env):
    async def body(slot, store, server):
        task = suites.miniwob_tasks(names=["click-test"])[0]
        await slot.reset(task, seed=0)
        try:
            await slot._page.goto("chrome://crash")  # fault injection: kill the renderer
        except Exception:
            pass
        crashed = await slot.step("click(#0)")
        obs = await slot.reset(task, seed=1)
        after = await slot.step(oracle_action("click-test", obs))
        return crashed, after

    crashed, after = browser_env(body)
    assert crashed.done and crashed.info["end"] == "page_crashed" and crashed.reward == 0.0
    assert after.reward == 1.0


def test_hung_page_times_out_and_the_next_reset_recovers(browser_env):
    async def body(slot, store, server):
        task = suites.miniwob_tasks(names=["click-test"])[0]
        await slot.reset(task, seed=0)
        await slot._page.evaluate("setTimeout(() => { while (true) {} }, 0)")  # fault injection: a busy loop
        hung = await slot.step("click(#0)")
        obs = await slot.reset(task, seed=1)
        return hung, await slot.step(oracle_action("click-test", obs))

    hung, after = browser_env(body, config=env.EnvConfig(step_timeout_s=2.0))
    assert hung.done and hung.info["end"] == "timeout"
    assert after.reward == 1.0


SITE = """<html><body><p id=q>Open hours</p>
<button onclick="location.href='http://blocked.invalid/steal'">away</button>
<a href="file:///etc/hostname">local file</a><p>Open Monday 9:00 to 5pm</p></body></html>"""


def _site_task(server, judge="rubric_keywords"):
    return env.Task(id="webgym/local", url=server.base + "index.html", goal="When is it open?", judge=judge,
                    difficulty="easy", split="train", family="127.0.0.1", max_steps=5,
                    rubric=(("9am OR 9:00", "5pm"),))


def test_navigation_outside_allowed_origins_is_blocked(browser_env, tmp_path):
    (tmp_path / "index.html").write_text(SITE)

    async def body(slot, store, server):
        task = _site_task(server)
        obs = await slot.reset(task, seed=0)
        button = next(e for e in obs.elements if e.text == "away")
        away = await slot.step(env.Action("click", mark=button.mark))
        obs = await slot.reset(task, seed=0)
        link = next(e for e in obs.elements if e.text == "local file")
        local = await slot.step(env.Action("click", mark=link.mark))
        return away, local, list(slot.blocked), local.obs.url

    away, local, blocked, url = browser_env(body, server_root=tmp_path)
    assert away.done and away.info["end"] == "blocked_navigation"
    assert blocked == ["http://blocked.invalid/steal"]  # aborted by the router: no request left the machine
    assert not local.done and url.startswith("http://127.0.0.1")  # chromium refuses file:// from a web page


def test_webgym_task_is_judged_on_the_answer(browser_env, tmp_path):
    (tmp_path / "index.html").write_text(SITE)

    async def body(slot, store, server):
        task = _site_task(server)
        await slot.reset(task, seed=0)
        right = await slot.step('answer("Monday 9:00 to 5pm")')
        await slot.reset(task, seed=0)
        wrong = await slot.step('answer("Monday only")')
        return right, wrong

    right, wrong = browser_env(body, server_root=tmp_path)
    assert right.done and right.info["end"] == "answer" and right.reward == 1.0
    assert wrong.done and wrong.reward == 0.0


def test_dead_browser_is_relaunched(browser_env):
    async def body(slot, store, server):
        task = suites.miniwob_tasks(names=["click-test"])[0]
        await slot.reset(task, seed=0)
        await slot.browser._browser.close()  # fault injection: chromium goes away
        died = await slot.step("click(#0)")
        obs = await slot.reset(task, seed=1)
        return died, await slot.step(oracle_action("click-test", obs)), slot.browser.launches

    died, after, launches = browser_env(body)
    assert died.done and died.info["end"] == "browser_died"
    assert after.reward == 1.0 and launches == 2


def test_screenshots_are_references_and_are_freed(browser_env):
    async def body(slot, store, server):
        task = suites.miniwob_tasks(names=["login-user"])[0]
        obs = await slot.reset(task, seed=0)
        keys = [obs.screenshot]
        while True:
            r = await slot.step(oracle_action("login-user", obs))
            keys.append(r.obs.screenshot)
            obs = r.obs
            if r.done:
                break
        held = store.nbytes
        jpeg = store.get(keys[0])
        freed = store.free(slot.episode)
        return keys, held, jpeg, freed, store.nbytes

    keys, held, jpeg, freed, left = browser_env(body)
    assert all(isinstance(k, str) and len(k) < 64 for k in keys)
    assert jpeg[:2] == b"\xff\xd8"  # JPEG bytes live in the store only
    assert held > 0 and freed == held and left == 0


def test_no_reward_from_another_tasks_page(browser_env):
    """A slot's page keeps its history across tasks. go_back() at an episode's first page is refused (it would land
    on the previous task's page, whose own script would then pay the reward), and an episode that reaches another
    task's page by any other way ends as blocked_navigation with reward 0."""
    async def body(slot, store, server):
        click_test, enter_time, click_button = (suites.miniwob_tasks(names=[n])[0] for n in
                                                ("click-test", "enter-time", "click-button"))
        out = {}
        for tries in range(2):
            await slot.reset(click_test, seed=tries)
            obs = await slot.reset(enter_time, seed=tries)
            back = await slot.step("go_back()")
            rest = []
            for a in ("click(500, 500)", "click(#0)"):  # the replies that scored on click-test before the fix
                if not (rest and rest[-1].done):
                    rest.append(await slot.step(a))
            out[f"back{tries}"] = (obs, back, rest)
        await slot.reset(enter_time, seed=5)  # within an episode go_back() still works: a same-page entry
        await slot._page.evaluate("location.hash = 'x'")
        out["inner"] = await slot.step("go_back()")
        out["inner_url"] = slot._page.url
        await slot.reset(enter_time, seed=6)  # another task's page reached without go_back (a page's own link)
        await slot._page.goto(server.base + click_button.url)
        out["elsewhere"] = await slot.step("click(#0)")
        return out

    out = browser_env(body)
    for tries in range(2):
        obs, back, rest = out[f"back{tries}"]
        assert back.obs.error == "no earlier page in this episode" and not back.done
        assert back.obs.url == obs.url and back.obs.goal == obs.goal  # still on enter-time, its goal intact
        assert all(r.reward == 0.0 for r in [back] + rest)
    inner = out["inner"]
    assert inner.obs.error is None and out["inner_url"].endswith("enter-time.html")
    assert out["elsewhere"].done and out["elsewhere"].reward == 0.0
    assert out["elsewhere"].info["end"] == "blocked_navigation"
