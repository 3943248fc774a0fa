"""The LLM rubric judge (asyncwebrl/judge.py) against a local OpenAI-compatible endpoint that answers from a script."""
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from asyncwebrl import load
from asyncwebrl.judge import ChatJudge, JudgeError

env = load("01_env")
TASK = env.Task(id="webgym/t", url="https://example.org", goal="When is the shop open?", judge="chat",
                difficulty="easy", split="train", family="example.org", max_steps=5,
                rubric=(("opens at 9am OR opens at 9:00",), ("closes at 5pm",)))


@pytest.fixture
def endpoint():
    """A chat-completions server: replies with `state["reply"](question)`, records every request it got."""
    state = dict(requests=[], reply=lambda q: "YES")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append(dict(path=self.path, auth=self.headers.get("Authorization"), body=body))
            question = body["messages"][0]["content"][-1]["text"]
            data = json.dumps(dict(choices=[dict(message=dict(role="assistant", content=state["reply"](question)))]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_port}/v1"
    yield state
    server.shutdown()


def test_success_needs_criterion_b_and_every_fact(endpoint):
    judge = ChatJudge(endpoint["url"], "judge-model", api_key="k", max_screenshots=2)
    shots = [b"first", b"second", b"third"]
    assert judge(TASK, "9am to 5pm", shots) == 1.0
    asked = [r["body"]["messages"][0]["content"] for r in endpoint["requests"]]
    assert len(asked) == 3  # criterion B once, then one question per fact
    assert "every claim" in asked[0][-1]["text"] and "9am to 5pm" in asked[0][-1]["text"]
    assert "opens at 9am OR opens at 9:00" in asked[1][-1]["text"] and "closes at 5pm" in asked[2][-1]["text"]
    # per fact, as the released prompt: the task for context, never the agent's answer
    assert all(TASK.goal in q[-1]["text"] and "9am to 5pm" not in q[-1]["text"] for q in asked[1:])
    images = [base64.b64decode(part["image_url"]["url"].split(",", 1)[1]) for part in asked[0][:-1]]
    assert images == [b"second", b"third"]  # the last max_screenshots, the final page included
    first = endpoint["requests"][0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer k"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0

    endpoint["requests"].clear()
    endpoint["reply"] = lambda q: "no." if "closes at 5pm" in q else "Yes, it does."
    assert judge(TASK, "9am to 5pm", shots) == 0.0 and len(endpoint["requests"]) == 3
    endpoint["requests"].clear()
    endpoint["reply"] = lambda q: "NO" if "every claim" in q else "YES"  # a hallucinated answer: stop at B
    assert judge(TASK, "9am to 5pm", shots) == 0.0 and len(endpoint["requests"]) == 1


def test_a_babbling_or_unreachable_judge_is_a_typed_error(endpoint):
    endpoint["reply"] = lambda q: "It depends on the screenshot."
    with pytest.raises(JudgeError, match="expected YES or NO"):
        ChatJudge(endpoint["url"], "m")(TASK, "9am", [b"x"])
    with pytest.raises(JudgeError, match="URLError|ConnectionRefused"):
        ChatJudge("http://127.0.0.1:9/v1", "m", timeout=5)(TASK, "9am", [b"x"])


@pytest.mark.browser
def test_env_asks_the_judge_with_the_episode_screenshots_and_survives_its_failure(browser_env, endpoint, tmp_path):
    (tmp_path / "index.html").write_text("<html><body><p>Open 9:00 to 5pm</p></body></html>")
    env.JUDGES["chat-test"] = ChatJudge(endpoint["url"], "m")

    async def body(slot, store, server):
        task = env.Task(id="webgym/local", url=server.base + "index.html", goal="When is it open?", judge="chat-test",
                        difficulty="easy", split="train", family="127.0.0.1", max_steps=5, rubric=(("9:00",),))
        obs = await slot.reset(task, seed=0)
        judged = await slot.step('answer("9:00 to 5pm")')
        endpoint["reply"] = lambda q: "maybe"
        await slot.reset(task, seed=0)
        babbled = await slot.step('answer("9:00 to 5pm")')
        return store.get(obs.screenshot), judged, babbled

    try:
        screenshot, judged, babbled = browser_env(body, server_root=tmp_path)
    finally:
        del env.JUDGES["chat-test"]
    assert judged.done and judged.info["end"] == "answer" and judged.reward == 1.0
    sent = endpoint["requests"][0]["body"]["messages"][0]["content"][0]["image_url"]["url"]
    assert base64.b64decode(sent.split(",", 1)[1]) == screenshot  # the page the agent saw, as JPEG bytes
    assert babbled.done and babbled.reward == 0.0 and babbled.info["end"] == "judge_error"
    assert "expected YES or NO" in babbled.info["judge_error"]


def test_rubric_keywords_judge():
    task = env.Task(
        id="t", url="http://x", goal="g", judge="rubric_keywords", difficulty="easy", split="train", family="x",
        rubric=(("9am OR 9:00", "5pm"), ("Monday",)))
    judge = env.JUDGES["rubric_keywords"]
    assert judge(task, "Open Monday 9:00 to 5pm", []) == 1.0
    assert judge(task, "Open Monday 9:00", []) == 0.0
