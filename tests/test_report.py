"""The trajectory viewer (`06_eval.py --html RUN_DIR`, asyncwebrl/report.py), used as a user would: opened from disk in
headless chromium, filtered, an episode opened; its images load, the click marker sits where the action clicked, a
malformed reply shows its error."""
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncwebrl import load
from asyncwebrl.browser import CHROMIUM_FLAGS, EnvConfig
from asyncwebrl.report import collect, target, write_report

evaluate = load("06_eval")


def _jpeg(w=160, h=210, color="white") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG")
    return buf.getvalue()


MARKS = [[0, 0, 10, 10], [10, 20, 40, 30]]


def make_run(root):
    """A run directory as 05 and 06 write it: three metrics rows, two logged training trajectories (a success
    that clicks mark 1, a failure whose second reply is malformed and whose first clicks at (500, 250)), and one
    evaluation episode that types into mark 0."""
    run = root / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(dict(version=v, success=s, steps=3 - v / 2,
                                                                  tokens_per_step=t))  # NaN: a mean over nothing
                                                 for v, s, t in ((1, 0.25, float("nan")), (2, 0.5, 18),
                                                                 (3, 0.75, 17))) + "\n")
    trajs = {("v0001", "traj1"): dict(reward=1.0, end="task_done", steps=[
                 dict(reply="Memory: go\nAction: click(#1)", action_error=None, version=0, marks=MARKS)]),
             ("v0003", "traj9"): dict(reward=0.0, end="max_steps", steps=[
                 dict(reply="Memory: look\nAction: click(500, 250)", action_error=None, version=1, marks=MARKS),
                 dict(reply="Memory: hmm\nAction: clik(#0)", action_error="unknown_action", version=2, marks=MARKS)])}
    for (v, name), t in trajs.items():
        folder = run / "trajectories" / v / name
        folder.mkdir(parents=True)
        for n, s in enumerate(t["steps"]):
            (folder / f"step{n:02d}.jpg").write_bytes(_jpeg(color=("white", "gray")[n]))
            s.update(tokens=12, screenshot=f"step{n:02d}.jpg")
        (folder / "trajectory.json").write_text(json.dumps(dict(task="miniwob/click-button", difficulty="easy",
                                                                seed=1, trained_at=int(v[1:]) - 1, **t)))
    (run / "eval-model-test-greedy" / "e0").mkdir(parents=True)
    (run / "eval-model-test-greedy" / "e0" / "step00.jpg").write_bytes(_jpeg())
    record = dict(task="miniwob/enter-text", difficulty="medium", reward=0.0, end="max_steps", steps=1, trace=[
        dict(memory="typing", action='type(#0, "hello")', action_error=None, tokens=9, marks=MARKS,
             screenshot="eval-model-test-greedy/e0/step00.jpg")])
    (run / "eval-model-test-greedy.json").write_text(json.dumps(dict(split="test", mode="greedy", records=[record])))
    return run


def test_the_data_has_every_episode_its_staleness_and_where_each_action_acts(tmp_path):
    data = collect(make_run(tmp_path))
    assert [(e["source"], e["version"], e["success"]) for e in data["episodes"]] == [
        ("train", 1, True), ("train", 3, False), ("eval test greedy", None, False)]
    ok, failed, typed = data["episodes"]
    assert ok["steps"][0]["target"] == dict(label="click(#1)", x=30, y=35, box=MARKS[1])
    assert failed["steps"][0]["target"] == dict(label="click(500, 250)", x=80, y=52.5)
    assert failed["steps"][1]["target"] is None and failed["steps"][1]["error"] == "unknown_action"
    assert [s["staleness"] for s in failed["steps"]] == [1, 0] and ok["steps"][0]["staleness"] == 0
    assert typed["steps"][0]["target"]["text"] == "hello" and typed["steps"][0]["size"] == [160, 210]
    assert [m["success"] for m in data["metrics"]] == [0.25, 0.5, 0.75]
    assert [m["tokens_per_step"] for m in data["metrics"]] == [None, 18, 17]


@given(st.text(max_size=80), st.lists(st.lists(st.floats(-1e6, 1e6), min_size=4, max_size=4), max_size=5))
@settings(max_examples=300, deadline=None)
def test_any_reply_gives_a_target_on_the_screenshot_or_none(text, marks):
    t = target(text, marks, (160, 210))
    assert t is None or (isinstance(t["label"], str) and ("x" not in t or isinstance(t["x"], float | int)))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)


@given(st.one_of(st.text(max_size=200), JSON.map(json.dumps),
                 st.fixed_dictionaries({"steps": st.lists(st.dictionaries(
                     st.sampled_from(["reply", "action_error", "version", "screenshot", "marks", "tokens"]), JSON),
                     max_size=3)}, optional={"task": JSON, "reward": JSON, "end": JSON}).map(json.dumps)))
@settings(max_examples=150, deadline=None)
def test_any_damaged_trajectory_file_is_skipped_and_said_the_rest_is_shown(tmp_path_factory, text):
    run = make_run(tmp_path_factory.mktemp("damaged"))
    (run / "trajectories" / "v0003" / "traj9" / "trajectory.json").write_text(text)
    out = write_report(run)
    data = collect(run)
    assert out.is_file() and len(data["episodes"]) + len(data["skipped"]) == 3 and data["episodes"][0]["success"]


@pytest.mark.browser
def test_the_report_opens_from_disk_filters_and_draws_each_action(tmp_path):
    from playwright.sync_api import sync_playwright

    out = write_report(make_run(tmp_path))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=EnvConfig().chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(out.as_uri())
            rows = page.locator("#index tbody tr")
            assert rows.count() == 3 and page.locator("#curves svg polyline").count() >= 3
            page.select_option("#f-success", "no")
            assert rows.count() == 2
            page.select_option("#f-source", "train")
            assert rows.count() == 1 and "max_steps" in rows.first.inner_text()
            rows.first.click()
            page.wait_for_selector(".step img")
            page.wait_for_function("[...document.images].every(i => i.complete)")
            assert page.eval_on_selector_all(".step img", "imgs => imgs.map(i => i.naturalWidth)") == [160, 160]
            assert "parse error: unknown_action" in page.locator(".step").nth(1).inner_text()
            assert page.locator(".step").nth(1).locator(".marker").count() == 0  # nothing was clicked
            img, marker = page.locator(".step img").first.bounding_box(), page.locator(".marker").first.bounding_box()
            x = (marker["x"] + marker["width"] / 2 - img["x"]) / img["width"] * 160
            y = (marker["y"] + marker["height"] / 2 - img["y"]) / img["height"] * 210
            assert abs(x - 80) < 1 and abs(y - 52.5) < 1  # click(500, 250) on a 160 x 210 screenshot
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            page.goto(out.as_uri() + "#ep0")  # a success that clicked mark 1: the marker at the box's centre
            page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
            img, marker = page.locator(".step img").first.bounding_box(), page.locator(".marker").first.bounding_box()
            box = page.locator(".box").first.bounding_box()
            assert abs((marker["x"] + marker["width"] / 2 - img["x"]) / img["width"] * 160 - 30) < 1
            assert abs((box["x"] - img["x"]) / img["width"] * 160 - 10) < 1
            page.goto(out.as_uri() + "#ep2")  # the evaluation episode: the typed text is drawn
            assert page.locator(".typed").first.inner_text() == "hello"
        finally:
            browser.close()


def open_real_report(run_dir, shot_path=None) -> dict:
    """A real run's report (05's logged trajectories, 06's evaluations), opened as a user would: every episode's
    page shows its screenshots, and every click marker sits inside the screenshot."""
    from playwright.sync_api import sync_playwright

    out, seen = write_report(run_dir), dict(episodes=0, images=0, markers=0)
    seen["drawable"] = sum(bool(s["image"] and s["target"] and "x" in s["target"])
                           for e in collect(run_dir)["episodes"] for s in e["steps"])  # clicks and typing on a mark
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=EnvConfig().chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(out.as_uri())
            seen["episodes"] = page.locator("#index tbody tr").count()
            for i in range(seen["episodes"]):
                page.goto(out.as_uri() + f"#ep{i}")
                page.wait_for_function("[...document.images].every(i => i.complete)")
                widths = page.eval_on_selector_all(".step img", "imgs => imgs.map(i => i.naturalWidth)")
                assert widths and all(w > 0 for w in widths), (i, widths)
                seen["images"] += len(widths)
                for k in range(page.locator(".step").count()):
                    step = page.locator(".step").nth(k)
                    if step.locator(".marker").count():
                        img, m = step.locator("img").bounding_box(), step.locator(".marker").bounding_box()
                        cx, cy = m["x"] + m["width"] / 2, m["y"] + m["height"] / 2
                        assert img["x"] <= cx <= img["x"] + img["width"] and img["y"] <= cy <= img["y"] + img["height"]
                        seen["markers"] += 1
            if shot_path:
                page.goto(out.as_uri() + "#ep0")
                page.screenshot(path=str(shot_path), full_page=True)
        finally:
            browser.close()
    return seen


def test_html_flag_writes_the_report_and_refuses_a_missing_run(tmp_path, capsys):
    run = make_run(tmp_path)
    assert evaluate.main(["--html", str(run)]) == 0
    assert (run / "report.html").is_file() and "report.html" in capsys.readouterr().out
    assert evaluate.main(["--html", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
