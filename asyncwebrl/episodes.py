"""Play whole episodes with any agent, many at once, for evaluation (06) and for collecting demonstrations (05's
warm start). Not the training rollout (04's everlasting pool is that): here every running episode waits for the
others at each step, so one agent call acts for all of them at once (one batched sample for a model).

An agent is anything with `act(episodes) -> [(Response, n_tokens)]`, one per running episode (02's Response:
memory, action, action_text, error); see 06_eval.py for the model, random and oracle agents.
"""
from __future__ import annotations

import asyncio
import collections
import sys
from dataclasses import dataclass, field

from asyncwebrl import load

env = load("01_env")
policy_mod = load("02_policy")


@dataclass
class Episode:
    task: object  # 01.Task
    seed: int
    name: str  # its ScreenshotStore episode
    obs: object = None  # the current observation
    state: policy_mod.AgentState = field(default_factory=policy_mod.AgentState)
    steps: int = 0
    tokens: int = 0  # response tokens, all steps together
    reward: float = 0.0
    end: str = ""
    scratch: dict = field(default_factory=dict)  # per-episode notes of the agent (e.g. a demonstrator's plan)
    trace: list = field(default_factory=list)  # per step: memory, action, error, screenshot key, element boxes

    def record(self) -> dict:
        t = self.task
        return dict(task=t.id, family=t.family, difficulty=t.difficulty, split=t.split, seed=self.seed,
                    reward=self.reward, success=self.reward > 0, steps=self.steps, tokens=self.tokens, end=self.end)


async def _play(agent, jobs: list, store, workers: int, keep_screenshots: bool, progress) -> list[Episode]:
    envs = env.BrowserEnvs(store)
    await envs.start()
    queue = collections.deque(enumerate(jobs))
    slots = [envs.slot(i) for i in range(max(1, min(workers, len(jobs))))]
    running: dict[int, Episode] = {}
    done: list[Episode] = []

    async def start(i: int) -> None:
        n, (task, seed) = queue.popleft()
        ep = Episode(task, seed, name=f"play{n}")
        try:
            ep.obs = await slots[i].reset(task, seed, episode=ep.name)
        except RuntimeError as e:  # a page that cannot start twice in a row: a failed episode, said out loud
            print(f"[play] {e}", file=sys.stderr, flush=True)
            ep.end = "reset_failed"
            running[i] = ep
            return finish(i)
        running[i] = ep

    def finish(i: int) -> None:
        ep = running.pop(i)
        done.append(ep)
        if not keep_screenshots:
            store.free(ep.name)
        if progress is not None:
            progress(len(done), len(jobs))

    try:
        while queue or running:
            free = [i for i in range(len(slots)) if i not in running][:len(queue)]
            await asyncio.gather(*(start(i) for i in free))
            order = list(running)
            if not order:
                continue
            replies = await asyncio.to_thread(agent.act, [running[i] for i in order])
            results = await asyncio.gather(*(slots[i].step(r.action if r.action is not None else r.action_text)
                                             for i, (r, _) in zip(order, replies)))
            for i, (reply, tokens), result in zip(order, replies, results):
                ep = running[i]
                ep.trace.append(dict(memory=reply.memory, action=reply.action_text, action_error=reply.error,
                                     tokens=tokens, screenshot=ep.obs.screenshot,
                                     marks=[list(e.box) for e in ep.obs.elements]))
                ep.steps += 1
                ep.tokens += tokens
                policy_mod.update_state(ep.state, ep.obs, reply, result)
                ep.obs = result.obs
                if result.done:
                    ep.reward, ep.end = result.reward, result.info.get("end", "")
                    finish(i)
    finally:
        for s in slots:
            await s.close()
        await envs.close()
    return sorted(done, key=lambda e: int(e.name[4:]))


def play(agent, jobs: list, store=None, workers: int = 8, keep_screenshots: bool = False,
         progress=None) -> list[Episode]:
    """Play every (task, seed) job once; returns the finished Episodes in job order."""
    store = store if store is not None else env.ScreenshotStore()
    return asyncio.run(_play(agent, jobs, store, workers, keep_screenshots, progress))


def print_progress(label: str):
    """One updating line on a terminal; in a log file, a line per tenth of the work."""
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        if tty:
            print(f"\r{label}: {done}/{total} episodes", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:
            print(f"{label}: {done}/{total} episodes", file=sys.stderr, flush=True)
    return show
