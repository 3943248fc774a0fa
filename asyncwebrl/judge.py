"""The WebGym rubric judge, asked of a model behind any OpenAI-compatible chat endpoint.

The paper's reward on open-web tasks comes from an LLM judge (gemini-2.5-flash in the released config). WebGym's
rule, which this follows: an episode that ends with `answer` succeeds iff
    criterion B  every claim in the final answer is visible in the screenshots (anti-hallucination), and
    criterion A  for every rubric fact, the screenshots show evidence of it ("a OR b": either one is enough),
one yes/no question each, reward = 1 if all say yes else 0. Any endpoint that speaks /v1/chat/completions serves:
`vllm serve Qwen/Qwen3-VL-8B-Instruct`, Gemini's OpenAI-compatible URL, OpenAI's. Register it in JUDGES below
(05_train.py does so for `--judge chat`). Blocking checks and per-screenshot evidence selection are not done here.
"""
from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request

CRITERION_B = ("A web agent was given this task:\n{goal}\n\nIts final answer was:\n{answer}\n\n"
               "Is every claim in the final answer visible in the screenshots? Reply with YES or NO first.")
# Per fact, as the released prompt: the task and the fact's group for context, never the agent's answer (the
# screenshots alone must show the fact; criterion B already checked the answer against them).
CRITERION_A = ("A web agent was given this task (for context only):\n{goal}\n\nFact group (for context only):\n"
               "{group}\n\nDo the screenshots show evidence of this fact: {fact}\n(when the fact lists alternatives "
               "joined by OR, any one of them is enough). Reply with YES or NO first.")


class JudgeError(RuntimeError):
    """The judge could not be asked or did not answer YES/NO; the episode ends as `judge_error`, reward 0."""


class ChatJudge:
    def __init__(self, base_url: str, model: str, api_key: str = "", max_screenshots: int = 8, timeout: float = 120):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.max_screenshots, self.timeout = model, api_key, max_screenshots, timeout

    def ask(self, question: str, screenshots: list[bytes]) -> bool:
        images = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(s).decode()}}
                  for s in screenshots]
        body = dict(model=self.model, temperature=0, max_tokens=8,
                    messages=[{"role": "user", "content": images + [{"type": "text", "text": question}]}])
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())["choices"][0]["message"]["content"] or ""
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"judge {self.url}: {type(e).__name__}: {e}") from None
        verdict = re.match(r"\W*(yes|no)\b", reply, re.IGNORECASE)
        if verdict is None:
            raise JudgeError(f"judge {self.url}: expected YES or NO, got {reply[:80]!r}")
        return verdict.group(1).lower() == "yes"

    def __call__(self, task, answer: str, screenshots: list[bytes]) -> float:
        """judge(task, answer, screenshots) -> 1.0 or 0.0; stops at the first NO (every later question is moot)."""
        shots = screenshots[-self.max_screenshots:]  # the last screenshot always goes (the final page)
        if not self.ask(CRITERION_B.format(goal=task.goal, answer=answer), shots):
            return 0.0
        questions = [CRITERION_A.format(goal=task.goal, group="; ".join(group), fact=fact)
                     for group in task.rubric for fact in group]
        return float(all(self.ask(q, shots) for q in questions))


def rubric_keywords_judge(task, answer: str, screenshots: list[bytes]) -> float:
    """Deterministic stand-in for WebGym's LLM judge: every fact must appear in the answer (case-insensitive);
    a fact written "a OR b" needs one of its alternatives. Success is all-or-nothing, as in WebGym."""
    answer = answer.lower()
    facts = [f for group in task.rubric for f in group]
    return float(all(any(alt.strip().lower() in answer for alt in f.split(" OR ")) for f in facts))


# judge(task, answer, screenshots) -> reward in [0, 1], by the name a Task's `judge` field gives (01_env.py). The
# paper's LLM judge is ChatJudge above; 05_train.py registers it as "chat" for --judge chat.
JUDGES = {"rubric_keywords": rubric_keywords_judge}
