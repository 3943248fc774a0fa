"""Fakes for the loop tests: an env, a sampler and a learner with scripted durations and rewards, no browser, no
model. They honour the same interfaces as 01's BrowserEnv, 02's samplers and 04's Learner."""
import asyncio
import random
import threading
import time

import torch

from asyncwebrl import load, weights

env = load("01_env")
pol = load("02_policy")


def constant(n):
    return lambda rng: n


def long_tail(short, long, p_long):
    return lambda rng: long if rng.random() < p_long else short


class FakeEnvs:
    def __init__(self, store, length=constant(3), step_s=0.002, p_success=0.5, fail_every=0, jpeg=None,
                 before_reset=None, p_fault=0.0):
        self.store, self.length, self.step_s, self.p_success, self.fail_every = store, length, step_s, p_success, \
            fail_every
        self.p_fault, self.faulted = p_fault, []  # episodes that end with one of 01.FAULT_ENDS (reward 0), by name
        self.before_reset = before_reset  # async (task, episode) -> None, may raise: a scripted env failure
        self.jpeg = jpeg  # a real screenshot (JPEG bytes) for a real policy; None: a few bytes that only fakes read
        self.slots, self.resets, self.started, self.closed, self.reset_log = [], 0, False, False, []

    async def start(self):
        self.started = True

    def slot(self, i):
        s = FakeEnv(self, i)
        self.slots.append(s)
        return s

    async def close(self):
        self.closed = True


class FakeEnv:
    def __init__(self, owner: FakeEnvs, i: int):
        self.owner, self.i, self.closed = owner, i, False

    def _obs(self):
        shot = self.owner.jpeg or f"{self.episode}/{self.t}".encode()
        key = self.owner.store.put(self.episode, shot)
        marks = (env.Element(0, "button", "OK", (1.0, 1.0, 9.0, 9.0)),) if self.owner.jpeg else ()
        return env.Observation(goal=f"goal {self.task.id}", url="fake://", screenshot=key, step=self.t,
                               elements=marks)

    async def reset(self, task, seed, episode):
        o = self.owner
        o.resets += 1
        o.reset_log.append((episode, task.id, seed))
        if o.fail_every and o.resets % o.fail_every == 0:
            raise RuntimeError("scripted env failure")
        if o.before_reset is not None:
            await o.before_reset(task, episode)
        rng = random.Random(episode)  # scripted per episode: its length and its reward
        self.task, self.episode, self.t = task, episode, 0
        self.steps, self.reward = o.length(rng), float(rng.random() < o.p_success)
        self.fault = rng.choice(sorted(env.FAULT_ENDS)) if rng.random() < o.p_fault else None
        await asyncio.sleep(o.step_s)
        return self._obs()

    async def step(self, action):
        await asyncio.sleep(self.owner.step_s)
        self.t += 1
        done = self.t >= self.steps
        if done and self.fault:  # the page crashed, hung, ... or the judge failed: no reward, an end of its own
            self.owner.faulted.append((self.episode, self.fault))
            return env.StepResult(self._obs(), 0.0, True, {"end": self.fault, "error": "scripted fault"})
        return env.StepResult(self._obs(), self.reward if done else 0.0, done, {"end": "task_done"} if done else {})

    async def close(self):
        self.closed = True


class FakeSampler:
    """Sleeps `base_s + per_reply_s * n` per batch (a batched engine's cost shape); checks screenshots resolve."""

    def __init__(self, base_s=0.004, per_reply_s=0.0002):
        self.base_s, self.per_reply_s, self.version = base_s, per_reply_s, 0
        self.lock, self.batches, self.loads = threading.Lock(), [], []

    def turn(self, obs, state):
        return pol.Turn(prompt=obs.goal, images=(obs.screenshot,), n_marks=0)

    def sample(self, turns, store):
        with self.lock:
            for t in turns:
                store.get(t.images[0])  # the reference still resolves: nothing was freed under a running episode
            time.sleep(self.base_s + self.per_reply_s * len(turns))
            self.batches.append(len(turns))
            return [pol.Sample("Memory: m\nAction: click(#0)", [1, 2, 3], [-0.5] * 3, self.version, False)
                    for _ in turns]

    def load_weights(self, folder, version):
        with self.lock:
            self.version = version
            self.loads.append(version)
            return [weights.digest_of(folder)]


class FakeAsyncEngine(FakeSampler):
    """An engine that batches continuously by itself, as vLLM's AsyncLLM: started in the pool's event loop, one
    request per episode step (`asample`), `reply_s` each, any number in flight."""

    def __init__(self, reply_s=0.005):
        super().__init__()
        self.reply_s, self.in_flight, self.peak, self.started, self.closed = reply_s, 0, 0, 0, 0
        self.replies = 0  # requests answered

    async def start(self):
        self.started += 1

    async def asample(self, turn, store):
        store.get(turn.images[0])
        version = self.version  # stamped when the request starts
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(self.reply_s)
        self.in_flight -= 1
        self.replies += 1
        return pol.Sample("Memory: m\nAction: click(#0)", [1, 2, 3], [-0.5] * 3, version, False)

    def close(self):
        self.closed += 1


class FakeLearner:
    """Sleeps `train_s` per update and records, for every trained step, the trainer version and the step's version."""

    def __init__(self, train_s=0.01, loop=None):
        self.train_s, self.loop, self.batches, self.published = train_s, loop, [], []

    def update(self, groups):
        version = self.loop.version if self.loop else None
        self.batches.append([(version, t.id, t.versions) for g in groups for t in g.trajectories])
        time.sleep(self.train_s)
        return {"loss": 0.0}

    def publish(self, folder, dtype=None):  # one tensor: the real file handoff, at no cost
        self.published.append((str(folder), dtype))
        return weights.write([("version", torch.tensor([len(self.batches)], dtype=torch.float32))], folder, dtype)
