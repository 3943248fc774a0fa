"""asyncwebrl/engine_process.py: 02's transformers engine in a process of its own, driven as 04 drives vLLM."""
import asyncio
import os
import signal
import threading
import time

import pytest
import torch
from fakes import FakeEnvs

from asyncwebrl import load, weights
from asyncwebrl.engine_process import ProcessSampler

env = load("01_env")
pol = load("02_policy")

GOALS = [("Click on the OK button.", 3), ("Select nothing and press submit please, then stop.", 7), ("Go.", 1),
         ("Type hello into the box.", 12)]


def turns(sampler):
    return [sampler.turn(env.Observation(goal=g, url="http://x/", screenshot=f"ep:{i % 2}", elements=tuple(
        env.Element(j, "button", f"b{j}", (10.0, 10.0 + 20 * j, 40.0, 15.0)) for j in range(n))), pol.AgentState())
        for i, (g, n) in enumerate(GOALS * 2)]


@pytest.fixture
def engine(tiny_dir):
    sampler = ProcessSampler(pol.PolicyConfig(model=str(tiny_dir), max_new_tokens=32))
    yield sampler
    sampler.close()


def test_replies_match_the_trainer_and_a_refresh_lands_between_batches(engine, tiny_dir, shot_store, tmp_path):
    """The child's behaviour log-probs are the trainer's (same weights, fp32), concurrent requests are batched, and
    after a file refresh the engine holds exactly what was written and stamps the new version."""
    policy = pol.Policy(pol.PolicyConfig(model=str(tiny_dir), max_new_tokens=32))
    ts = turns(engine)
    assert [t.prompt for t in ts] == [t.prompt for t in turns(policy)]  # the parent builds the trainer's prompts

    async def run():
        first = await asyncio.gather(*[engine.asample(t, shot_store) for t in ts])
        new = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in policy.model.named_parameters()}
        policy.model.load_state_dict(new, strict=False)
        wrote = weights.write(policy.model.state_dict().items(), tmp_path / "v5")
        held = await asyncio.to_thread(engine.load_weights, str(tmp_path / "v5"), 5)
        second = await asyncio.gather(*[engine.asample(t, shot_store) for t in ts])
        return first, wrote, held, second

    first, wrote, held, second = asyncio.run(run())
    assert held == [wrote] and engine.version == 5
    assert {s.version for s in first} == {0} and {s.version for s in second} == {5}
    with torch.no_grad():
        logp, mask = policy.logprobs(ts, [s.token_ids for s in second], shot_store)
    for i, s in enumerate(second):
        assert len(s.token_ids) == len(s.logprobs) == int(mask[i].sum())
        assert torch.allclose(logp[i, :len(s.logprobs)], torch.tensor(s.logprobs), atol=1e-4)
        assert pol.parse_response(s.text, s.truncated).action is not None  # constrained, as in the parent


def test_a_broken_request_fails_alone_and_a_dead_engine_fails_everything_loudly(engine, shot_store, tmp_path):
    ts = turns(engine)
    bad = env.ScreenshotStore()
    bad.put("ep", b"not an image")

    async def run():
        return await asyncio.gather(engine.asample(ts[1], shot_store), engine.asample(ts[0], bad),
                                    engine.asample(ts[2], shot_store), return_exceptions=True)

    good, broken, other = asyncio.run(run())
    assert isinstance(broken, RuntimeError) and "engine:" in str(broken)
    assert good.token_ids and other.token_ids
    os.kill(engine.proc.pid, signal.SIGKILL)

    async def after_death():
        return await asyncio.wait_for(engine.asample(ts[0], shot_store), 20)

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="engine process died"):
        asyncio.run(after_death())
    with pytest.raises(RuntimeError, match="engine process died"):
        engine.load_weights(str(tmp_path), 1)
    assert time.monotonic() - t0 < 20


class _SameWeights:
    """A learner that trains nothing and publishes the initial weights: the refresh check still runs every update."""

    def __init__(self, policy):
        self.policy, self.updates = policy, 0

    def update(self, groups):
        self.updates += 1
        return {}

    def publish(self, folder, dtype=None):
        return weights.write(self.policy.model.state_dict().items(), folder, dtype)


def _loop(tiny_dir, shot_store, updates):
    loop_mod = load("04_async_loop")
    cfg = pol.PolicyConfig(model=str(tiny_dir), max_new_tokens=16)
    engine, store = ProcessSampler(cfg), env.ScreenshotStore()
    tasks = [env.Task(id=f"t{i}", url="", goal="", judge="miniwob", difficulty="easy", split="train", family="f")
             for i in range(3)]
    loop = loop_mod.Loop(loop_mod.LoopConfig(workers=4, group_size=2, batch_groups=1, updates=updates,
                                             dynamic_sampling=False), FakeEnvs(store, jpeg=shot_store.get("ep:0")),
                         engine, _SameWeights(pol.Policy(cfg)), tasks, store)
    return loop, engine


def test_04_runs_on_the_engine_process_and_checks_every_refresh(tiny_dir, shot_store):
    loop, engine = _loop(tiny_dir, shot_store, updates=2)
    history = loop.run()
    assert len(history) == 2 and loop.stats.refreshes_checked == 2 and engine.version == 2
    assert not engine.proc.is_alive()  # the pool closed it
    batches = [s for s in loop.timeline.spans if s[:2] == ("inference", "sample")]
    steps = sum(len(t.steps) for t in loop.pool.trajectory_log)
    assert steps > 0 and sum(s[4]["n"] for s in batches) >= steps  # every reply came from a batch on the timeline


def test_a_dead_engine_stops_the_loop_with_its_reason(tiny_dir, shot_store):
    loop, engine = _loop(tiny_dir, shot_store, updates=1000)
    threading.Timer(3.0, lambda: os.kill(engine.proc.pid, signal.SIGKILL)).start()
    raised = []

    def run():
        try:
            loop.run()
        except RuntimeError as e:
            raised.append(str(e))

    runner = threading.Thread(target=run)
    runner.start()
    runner.join(60)
    if runner.is_alive():  # the bug this test is for: every episode retried forever against a dead engine
        loop.stop.set()
        runner.join(60)
        pytest.fail("the loop went on for 60 s after its engine died")
    assert raised and "engine process died" in raised[0]
    assert loop.stats.faults == 0  # the engine's death is not counted as the episodes' faults
