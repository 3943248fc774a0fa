"""04_async_loop with fakes (fast, no browser): the ledger, staleness, versions, sync mode, back-pressure, worker
restarts, clean shutdown, and the long-tail throughput gap; the real tiny policy and learner behind fake envs; then
one short real run of each mode (browser)."""
import _thread
import asyncio
import collections
import signal
import statistics
import threading
import time

import pytest
import torch
from fakes import FakeAsyncEngine, FakeEnvs, FakeLearner, FakeSampler, constant, long_tail

from asyncwebrl import ROOT, load

env = load("01_env")
aloop = load("04_async_loop")
pol_mod = load("02_policy")

TASKS = [env.Task(f"fake/t{i}", "fake://", "goal", "miniwob", "easy", "train", f"t{i}") for i in range(5)]


def make_loop(store=None, envs=None, sampler=None, train_s=0.01, **cfg):
    store = env.ScreenshotStore() if store is None else store  # (an empty store is falsy: it has a __len__)
    envs = FakeEnvs(store) if envs is None else envs
    sampler = FakeSampler() if sampler is None else sampler
    learner = FakeLearner(train_s)
    cfg = {"workers": 6, "group_size": 2, "batch_groups": 2, "updates": 6, **cfg}
    loop = aloop.Loop(aloop.LoopConfig(**cfg), envs, sampler, learner, TASKS, store)
    learner.loop = loop
    run = loop.run

    def run_or_give_up():  # a loop that stops making progress fails its test (too few updates) instead of hanging
        watchdog = threading.Timer(WATCHDOG_S, loop.stop.set)
        watchdog.start()
        try:
            return run()
        finally:
            watchdog.cancel()

    loop.run = run_or_give_up
    return loop, learner, envs, sampler, store


WATCHDOG_S = 20  # every fake loop here ends in under 2 s, on a loaded machine too


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path, monkeypatch):
    """Each test runs in its own empty working folder: the loop writes and deletes weight folders, and a bug (or a
    planted mutant) that turned a relative path into the working folder must not delete the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_real_policy_and_learner_train_through_the_loop(mode, tiny_dir, shot_store):
    """The real tiny policy, sampler and learner (on a GPU when there is one: bf16) behind fake envs that serve a
    real JPEG: every update is trained, the sampler follows the trainer's version, and the weights move."""
    pol = load("02_policy")
    jpeg = shot_store.get("ep:0")
    store = env.ScreenshotStore()
    c = pol.PolicyConfig(model=str(tiny_dir))
    policy, sampler = pol.Policy(c), pol.HFSampler(c)
    learner = aloop.Learner(policy, store)
    start = [p.detach().clone() for p in policy.model.parameters()]
    loop = aloop.Loop(aloop.LoopConfig(mode=mode, updates=2, workers=4, group_size=2, batch_groups=2,
                                       dynamic_sampling=False),
                      FakeEnvs(store, jpeg=jpeg), sampler, learner, TASKS, store)
    history = loop.run()
    assert [m["version"] for m in history] == [1, 2] and sampler.version == 2
    assert all(m["trajectories"] == 4 and m["staleness_max"] <= (0 if mode == "sync" else 2) for m in history)
    assert all(abs(m["iw_mean"] - 1) < 0.02 for m in history)  # behaviour ~ proximal: one version apart at most
    assert any(not torch.equal(a, b) for a, b in zip(start, policy.model.parameters()))


def test_every_refresh_is_checked_and_one_that_did_not_land_stops_the_run(tmp_path):
    sampler = FakeSampler()
    sampler.weights_dtype = torch.bfloat16  # what this engine wants: the trainer casts to it when it writes
    loop, learner, envs, sampler, store = make_loop(sampler=sampler, updates=3, weights_dir=str(tmp_path / "w"))
    loop.run()
    assert loop.stats.refreshes_checked == 3 and sampler.loads == [1, 2, 3]
    assert learner.published == [(str(tmp_path / "w" / f"v{v}"), torch.bfloat16) for v in (1, 2, 3)]
    assert not list((tmp_path / "w").iterdir())  # each version's files go once the engine holds them
    loop, *_ = make_loop(updates=2)
    loop.run()
    assert loop.weights_root is not None and not loop.weights_root.exists()  # the loop's own RAM folder too

    class StaleEngine(FakeSampler):  # its load "succeeded" but it still holds other weights
        def load_weights(self, folder, version):
            super().load_weights(folder, version)
            return ["1:5"]

    loop, learner, *_ = make_loop(sampler=StaleEngine(), updates=3)
    with pytest.raises(RuntimeError, match="^the loop failed:\n(.|\n)*refresh check failed at version 1"):
        loop.run()
    assert len(learner.batches) == 1  # stopped at the first refresh, not after training on old weights


def test_an_engine_that_batches_by_itself_gets_one_request_per_step_and_no_batch_barrier():
    engine = FakeAsyncEngine()
    loop, learner, envs, *_ = make_loop(sampler=engine, updates=4)
    loop.run()
    assert [m["version"] for m in loop.history] == [1, 2, 3, 4] and engine.loads == [1, 2, 3, 4]
    assert engine.started == 1 == engine.closed  # started in the pool's event loop, closed with it
    assert engine.batches == [] and loop.stats.inference_calls == 0  # never the batched path
    assert loop.stats.inference_replies >= sum(len(t.steps) for t in loop.pool.trajectory_log) > 0  # + open episodes
    assert loop.stats.inference_replies == engine.replies  # one count per answered request
    assert engine.peak > 1  # requests of different episodes are in flight together


def test_a_turn_that_breaks_the_sampler_fails_its_own_episode_only(capsys):
    """A batched sampler call that raises is retried one request at a time: the one bad turn's episode fails (and
    runs again), the others in its batch get their replies."""
    class OneBadTurn(FakeSampler):
        def __init__(self):
            super().__init__()
            self.calls, self.poisoned = [], 0

        def turn(self, obs, state):
            bad = self.poisoned < 2  # the first two turns ever asked for
            self.poisoned += bad
            return pol_mod.Turn(prompt="bad" if bad else obs.goal, images=(obs.screenshot,), n_marks=0)

        def sample(self, turns, store):
            self.calls.append(len(turns))
            if any(t.prompt == "bad" for t in turns):
                raise ValueError("an image the engine cannot read")
            return super().sample(turns, store)

    sampler = OneBadTurn()
    loop, *_ = make_loop(sampler=sampler, updates=3, workers=6, max_inference_batch=2)  # a failing pair too
    loop.run()
    assert loop.stats.faults == 2 and [m["version"] for m in loop.history] == [1, 2, 3]
    assert max(sampler.calls) > 1 and 1 in sampler.calls  # a failed batch, then its requests one by one
    assert capsys.readouterr().out.count("an image the engine cannot read") == 2


def test_waking_the_pool_before_it_runs_or_after_it_stopped_is_harmless():
    loop, *_ = make_loop(updates=1)
    loop.pool.wake()  # the trainer may say "something changed" before the rollout thread has its event loop
    loop.run()
    loop.pool.wake()  # or after it closed


def test_the_episodes_of_a_group_play_the_same_task_instance():
    """GRPO compares the G trajectories of one task instance: every episode of a group resets to the same task and
    the same seed, and different groups draw different seeds."""
    loop, learner, envs, *_ = make_loop(updates=3)
    loop.run()
    seen = {}
    for episode, task, seed in envs.reset_log:
        seen.setdefault(int(episode[1:].split(".")[0]), set()).add((task, seed))
    assert len(seen) >= 6 and all(len(v) == 1 for v in seen.values())  # one (task, seed) per group
    seeds = [seed for v in seen.values() for _, seed in v]
    assert all(isinstance(x, int) for x in seeds) and len(set(seeds)) == len(seeds)


def test_every_trajectory_is_trained_once_or_counted():
    loop, learner, envs, sampler, store = make_loop(updates=8)
    loop.run()
    ledger = loop.ledger()
    trained = [tid for batch in learner.batches for _, tid, _ in batch]
    assert len(trained) == len(set(trained)) == 8 * 2 * 2 == ledger["trained"]
    assert ledger["rejected"] > 0  # p_success 0.5, G = 2: about half the groups have all-equal rewards
    assert ledger["leftover"] == ledger["in_buffer"] + ledger["in_open_groups"] >= 0
    assert ledger["finished"] == len(loop.pool.trajectory_log)
    # screenshots of trained, rejected and dropped trajectories are freed; only leftovers' remain
    kept = {t.episode for g in list(loop.buffer._groups) + list(loop.pool.open.values()) for t in g.trajectories}
    assert {k.rsplit(":", 1)[0] for k in store._bytes} <= kept


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_no_trained_step_exceeds_max_staleness(max_staleness):
    loop, learner, *_ = make_loop(max_staleness=max_staleness, updates=8, train_s=0.02,
                                  envs=None)
    loop.run()
    worst = max(version - min(vs) for batch in learner.batches for version, _, vs in batch)
    assert worst <= max_staleness
    if max_staleness > 0:
        assert worst >= 1  # the pool really ran ahead of the trainer (overlap happened)


def test_versions_are_monotone_within_a_trajectory_and_refresh_lands_mid_episode():
    store = env.ScreenshotStore()
    envs = Held(store, until=1, length=constant(3))  # episode g0.1 waits, after its first step, for version 1
    loop, *_ = make_loop(store, envs=envs, updates=6)
    envs.loop = loop
    loop.run()
    trajs = loop.pool.trajectory_log
    assert all(t.versions == sorted(t.versions) for t in trajs)
    held = next(t for t in trajs if t.episode.startswith("g0.1."))
    assert held.versions[0] == 0 and held.versions[-1] >= 1  # a weight refresh landed between two of its steps


def test_sync_mode_trains_each_batch_on_one_version_the_current_one():
    loop, learner, _, sampler, _ = make_loop(mode="sync", updates=5)
    loop.run()
    for batch in learner.batches:
        versions = {v for _, _, vs in batch for v in vs}
        assert versions == {batch[0][0]}  # every step of the batch sampled by the trainer's current weights
    assert sampler.loads == [1, 2, 3, 4, 5]


def test_back_pressure_bounds_the_work_in_memory_when_the_trainer_is_slow():
    """Measured at every episode start and every buffer put (events, not a polling thread): what is in memory
    never exceeds the admission bound, however slow the trainer."""
    store = env.ScreenshotStore()
    loop, learner, *_ = make_loop(store, train_s=0.4, updates=3, workers=8, dynamic_sampling=False)
    pool, peak = loop.pool, {"buffer": 0, "live": 0}
    episode, put = pool._episode, loop.buffer.put

    async def counted_episode(*args):
        live = pool.in_flight + sum(len(g.trajectories) for g in list(pool.open.values())) \
            + sum(len(g.trajectories) for g in list(loop.buffer._groups))
        peak["live"] = max(peak["live"], live)
        return await episode(*args)

    def counted_put(group):
        put(group)
        peak["buffer"] = max(peak["buffer"], len(loop.buffer))

    pool._episode, loop.buffer.put = counted_episode, counted_put
    loop.run()
    c = loop.cfg
    batch = c.batch_groups * c.group_size
    assert 0 < peak["buffer"] <= (c.max_staleness + 1) * c.batch_groups
    assert batch < peak["live"] <= (c.max_staleness + 1) * batch  # admission: running + waiting <= (s + 1) B G
    assert loop.stats.started <= (c.max_staleness + 1 + c.updates) * batch  # not one episode per idle tick


def test_a_worker_whose_env_raises_is_restarted_and_the_pool_keeps_its_size(capsys):
    store = env.ScreenshotStore()
    envs = FakeEnvs(store, fail_every=5)
    loop, *_ = make_loop(store, envs=envs, updates=5, workers=4, slot_retries=3)
    loop.run()
    assert loop.stats.faults > 0 and loop.stats.trained == 5 * 4
    said = [line for line in capsys.readouterr().out.splitlines() if "restarting its env slot" in line]
    assert len(said) == loop.stats.faults and all("failed (RuntimeError: scripted env failure)" in x for x in said)
    assert len(envs.slots) == 4 + loop.stats.faults  # each failure: that worker's slot replaced, no more
    assert all(s.closed for s in envs.slots)


def test_an_env_that_always_raises_abandons_its_group_and_training_goes_on():
    store = env.ScreenshotStore()

    async def broken(task, episode):
        if task.id == "fake/t0":
            raise RuntimeError("broken page")

    loop, *_ = make_loop(store, envs=FakeEnvs(store, before_reset=broken), updates=4)
    loop.run()
    assert loop.stats.trained == 4 * 2 * 2 and loop.stats.faults >= 2
    assert all(t.task != "fake/t0" for t in loop.pool.trajectory_log)


def test_an_episode_ended_by_the_environment_or_the_judge_is_never_trained_and_its_slot_runs_again():
    """A third of the episodes end with a fault's end reason (a crashed page, a hang, a dead browser, a failed judge)
    and reward 0. None of them reaches the trainer or the learning curve; each is counted under its end reason, its
    screenshots are freed, and its slot runs again, so every group still trains G trajectories of the agent's."""
    store = env.ScreenshotStore()
    envs = FakeEnvs(store, p_fault=0.3, p_success=0.5)
    loop, learner, *_ = make_loop(store, envs=envs, updates=5, slot_retries=20, dynamic_sampling=False)
    loop.run()
    ledger, by_id = loop.ledger(), {t.id: t for t in loop.pool.trajectory_log}
    assert len(envs.faulted) >= 5 and ledger["faults"] == len(envs.faulted)
    assert ledger["faults_by_end"] == dict(collections.Counter(end for _, end in envs.faulted))
    assert all(by_id[i].end in env.AGENT_ENDS for i in loop.trained_ids) and len(loop.trained_ids) == 5 * 2 * 2
    assert {e for e, _ in envs.faulted}.isdisjoint(t.episode for t in loop.pool.trajectory_log)
    assert all(store.keys(e) == [] for e, _ in envs.faulted)
    assert ledger["started"] == ledger["finished"] + ledger["faults"] + ledger["cut"] + ledger["running"]
    assert ledger["abandoned"] == 0 and all(len(g) == 2 * 2 for g in learner.batches)
    row = loop.history[-1]  # the counters when the last update was logged: the pool ran on a little after it
    assert 0 < row["faults"] <= ledger["faults"] and sum(v for k, v in row.items() if k.startswith("fault_")) == \
        row["faults"]


def test_a_group_the_trainer_holds_when_the_loop_stops_is_accounted_for_and_freed():
    """B = 2: only group 0 ever completes (every later episode waits forever in its reset), so the trainer holds it
    while it waits for a second one; then the loop is stopped. The held group goes back to the buffer (the ledger's
    leftover), and the run frees every screenshot it leaves behind."""
    store = env.ScreenshotStore()

    async def stall(task, episode):
        if not episode.startswith("g0."):
            await asyncio.Event().wait()

    loop, *_ = make_loop(store, envs=FakeEnvs(store, before_reset=stall), workers=2, updates=1, batch_groups=2,
                         dynamic_sampling=False)
    threading.Timer(0.5, loop.stop.set).start()
    loop.run()
    ledger = loop.ledger()
    assert ledger["finished"] == 2 and ledger["trained"] == 0 and ledger["leftover"] == ledger["in_buffer"] == 2
    assert ledger["started"] == ledger["finished"] + ledger["faults"] + ledger["cut"] and ledger["cut"] == 2
    assert len(store) == 0


def test_every_end_reason_01_can_give_is_the_agents_or_a_fault_never_both():
    import re

    source = (ROOT / "01_env.py").read_text()
    said = set(re.findall(r'(?:_end\(|EpisodeEnd\(|end=)"(\w+)"', source))
    reasons = source[source.index("reason = ("):].split(")\n")[0]  # a Playwright error: which kind of page failure
    said |= set(re.findall(r'"(\w+)"', reasons))
    assert said >= {"task_done", "answer", "max_steps", "timeout", "page_crashed", "blocked_navigation", "judge_error"}
    assert said == env.AGENT_ENDS | env.FAULT_ENDS and not env.AGENT_ENDS & env.FAULT_ENDS


def test_shutdown_is_clean_on_keyboard_interrupt():
    # A shell's background job starts with SIGINT ignored, and then interrupt_main() does nothing: Ctrl-C's
    # handler is put in place for this test, and a second timer ends the run (and fails the test) if it never came.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    store = env.ScreenshotStore()
    envs = FakeEnvs(store, step_s=0.01)
    loop, *_ = make_loop(store, envs=envs, updates=10**6)
    loop.on_update = lambda metrics, groups: _thread.interrupt_main() if metrics["version"] == 1 else None
    watchdog = threading.Timer(60, loop.stop.set)
    watchdog.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run()
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGINT, previous)
    names = {t.name for t in threading.enumerate()}
    assert not names & {"rollout", "trainer"} and not any(n.startswith("inference") for n in names)
    assert envs.closed and all(s.closed for s in envs.slots)
    assert loop.version > 0  # it was really running


@pytest.mark.parametrize("batch_groups, first", [(2, 20), (3, 30)])
def test_a_loop_whose_groups_are_all_rejected_says_so_instead_of_hanging_quietly(capsys, batch_groups, first):
    """Every episode fails, so every group has equal rewards and dynamic sampling rejects it: no update can form.
    The pool says so after max(20, 10 B) groups in a row and at each power of two after; the run is then stopped
    from outside."""
    store = env.ScreenshotStore()
    loop, learner, *_ = make_loop(store, envs=FakeEnvs(store, p_success=0.0), updates=2, batch_groups=batch_groups)
    watchdog = threading.Timer(30, loop.stop.set)
    watchdog.start()

    def stop_at_40():
        while loop.pool.rejected_in_a_row < 40 and not loop.stop.is_set():
            time.sleep(0.01)
        loop.stop.set()
    threading.Thread(target=stop_at_40, daemon=True).start()
    try:
        loop.run()
    finally:
        watchdog.cancel()
    out = capsys.readouterr().out
    assert learner.batches == [] and loop.stats.groups_rejected >= 40
    said = [int(line.split("the last ")[1].split()[0]) for line in out.splitlines() if "groups were rejected" in line]
    assert said == [first, 32] and "--no-dynamic-sampling" in out


def test_batched_inference_serves_many_workers_per_call():
    """The first sampler call is held until all 8 workers wait for an action (an event, not a duration): the
    next call must serve every worker the first did not."""
    class Gated(FakeSampler):
        def sample(self, turns, store):
            while not self.batches and len(turns) + len(loop.pool.batcher.requests) < 8 and not loop.stop.is_set():
                time.sleep(0.001)
            return super().sample(turns, store)

    loop, _, _, sampler, _ = make_loop(workers=8, updates=4, sampler=Gated())
    watchdog = threading.Timer(60, loop.stop.set)  # fails the test rather than hang it
    watchdog.start()
    try:
        loop.run()
    finally:
        watchdog.cancel()
    first = sampler.batches[0]
    assert first == 8 or sampler.batches[1] == 8 - first  # every waiting worker served by the next call
    assert max(sampler.batches[:2]) >= 4 and loop.stats.inference_calls < loop.stats.inference_replies
    # counted when a call's replies are handed out (a last call may end after the pool stopped: not counted)
    assert len(sampler.batches) - 1 <= loop.stats.inference_calls <= len(sampler.batches)
    assert sum(sampler.batches[:-1]) <= loop.stats.inference_replies <= sum(sampler.batches)
    assert loop.version == 4
    with pytest.raises(ValueError, match="mode must be 'async' or 'sync', got 'fast'"):
        make_loop(mode="fast")


def throughput(mode, length, seed, **cfg):
    """Trained trajectories per second (every update consumes exactly B x G of them, so this is updates/s), the mean
    steps of the trajectories trained, the worst staleness of a trained step, and the trajectories dropped."""
    store = env.ScreenshotStore()
    envs = FakeEnvs(store, length=length, step_s=0.01, p_success=0.5)
    loop, *_ = make_loop(store, envs=envs, mode=mode, updates=10, workers=8, group_size=4, batch_groups=2,
                         train_s=0.04, dynamic_sampling=False, seed=seed, **cfg)
    t0 = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - t0
    return dict(rate=loop.stats.trained / wall, steps=statistics.mean(m["steps"] for m in loop.history),
                stale=max(m["staleness_max"] for m in loop.history), dropped=loop.stats.dropped_stale)


@pytest.mark.slow
def test_async_beats_sync_and_the_long_tail_explains_most_of_the_gap(capsys):
    """Same mean episode length (4 steps): constant, or a long tail (10% of episodes take 22 steps). Sync waits
    for the slowest episode of every batch and idles the pool while training; async does neither."""
    ratios, runs = {}, {}
    for name, length in (("constant", constant(4)), ("long_tail", long_tail(2, 22, 0.1))):
        runs[name] = [dict(async_=throughput("async", length, s), sync=throughput("sync", length, s),
                           drop=throughput("async", length, s, drop_stale=True)) for s in range(3)]
        ratios[name] = statistics.median(r["async_"]["rate"] / r["sync"]["rate"] for r in runs[name])
    tail = {k: statistics.median(r[k]["steps"] for r in runs["long_tail"]) for k in ("async_", "sync", "drop")}
    with capsys.disabled():
        print(f"\nasync/sync trained trajectories per second, median of 3: constant lengths "
              f"{ratios['constant']:.2f}x, long tail {ratios['long_tail']:.2f}x; mean steps of trained "
              f"trajectories with the long tail: async {tail['async_']:.1f}, sync {tail['sync']:.1f}, "
              f"async with drop_stale {tail['drop']:.1f}")
    assert ratios["constant"] > 1.0
    assert ratios["long_tail"] > 1.3 and ratios["long_tail"] > ratios["constant"]
    # groups finish out of order: with a long tail a long group can finish more than max_staleness (2) versions
    # after it was admitted. As released, it is trained anyway (its importance weights correct it) ...
    assert max(r["async_"]["stale"] for r in runs["long_tail"]) > 2
    assert all(r["async_"]["dropped"] == 0 and r["sync"]["stale"] == 0 for rs in runs.values() for r in rs)
    # ... with drop_stale it is dropped: no trained step is staler than the bound, and the long trajectories go
    # first, so the trained ones are shorter than sync's (the bias the released code avoids)
    assert all(r["drop"]["stale"] <= 2 for rs in runs.values() for r in rs)
    assert sum(r["drop"]["dropped"] for r in runs["long_tail"]) > 0 and tail["drop"] < tail["sync"]


def test_timeline_records_every_component():
    loop, *_ = make_loop(updates=3)
    loop.run()
    comps = {s[0].split("/")[0] for s in loop.timeline.spans}
    kinds = {s[1] for s in loop.timeline.spans}
    assert comps >= {"env", "inference", "trainer"} and kinds >= {"reset", "step", "sample", "train", "refresh", "idle"}
    # the trainer's train and refresh spans, each labelled with the version it trained from or refreshed to
    spans = {(c, k): [i.get("version") for c2, k2, _, _, i in loop.timeline.spans if (c2, k2) == (c, k)]
             for c, k in (("trainer", "train"), ("trainer", "refresh"))}
    assert spans[("trainer", "train")] == [0, 1, 2] and spans[("trainer", "refresh")] == [1, 2, 3]
    u = loop.timeline.utilisation()
    assert 0 < u["env"] <= 1 and 0 < u["trainer"] <= 1 and 0 < u["inference"] <= 1


@pytest.mark.browser
@pytest.mark.slow
def test_real_env_and_tiny_model_runs_in_both_modes_and_write_timelines(tmp_path):
    import json

    from experiments.loop_demo import real_run

    for mode in ("async", "sync"):
        r = real_run(mode, 2, ["click-button", "click-link"], tmp_path, max_steps=2, workers=3, group_size=2,
                     batch_groups=1, dynamic_sampling=False)
        assert r["updates"] == 2 and r["ledger"]["trained"] == 2 * 2 and r["samples"] >= 4
        spans = [json.loads(line) for line in (tmp_path / f"timeline_{mode}.jsonl").read_text().splitlines()]
        assert {s["component"].split("/")[0] for s in spans} >= {"env", "inference", "trainer"}
        assert {s["kind"] for s in spans} >= {"reset", "step", "sample", "train", "refresh"}


def test_drain_ablation_never_lets_a_refresh_land_mid_episode():
    store = env.ScreenshotStore()
    loop, *_ = make_loop(store, envs=FakeEnvs(store, length=constant(6)), drain=True, updates=5)
    history = loop.run()
    assert len(history) == 5 and all(len(set(t.versions)) == 1 for t in loop.pool.trajectory_log)
    drains = [(a, b) for c, k, a, b, _ in loop.timeline.spans if (c, k) == ("trainer", "drain")]
    resets = [a for c, k, a, b, _ in loop.timeline.spans if c.startswith("env/") and k == "reset"]
    # no episode starts during a drain, but the one whose slot was taken as the drain began (one at most: the event
    # loop runs one worker at a time between the admission check and the reset)
    assert len(drains) == 5 and sum(a < r < b for a, b in drains for r in resets) <= len(drains)


def test_by_value_ablation_carries_the_bytes_and_trains_from_them():
    store = env.ScreenshotStore()
    seen = []

    class Checking(FakeLearner):
        def update(self, groups):
            steps = [s for g in groups for t in g.trajectories for s in t.steps]
            images = aloop.StepImages(steps, env.ScreenshotStore())  # an empty store: bytes must travel along
            seen.extend(images.get(k) for s in steps for k in s.turn.images)
            return super().update(groups)

    loop = aloop.Loop(aloop.LoopConfig(workers=4, group_size=2, batch_groups=1, updates=3, screenshots_by_value=True),
                      FakeEnvs(store), FakeSampler(), Checking(), TASKS, store)
    loop.learner.loop = loop
    loop.run()
    assert seen and all(isinstance(b, bytes) and b for b in seen)


class Held(FakeEnvs):
    """One-step episodes, except that episode j = 1 of group 0 holds its step until the trainer reaches version
    `until` (an event, not a duration): group 0 then finishes out of order, `until` versions after its admission."""

    def __init__(self, store, until, length=constant(1), **kw):
        super().__init__(store, length=length, **kw)
        self.until, self.loop = until, None

    def slot(self, i):
        s = super().slot(i)
        real = s.step

        async def step(action):
            while s.episode.startswith("g0.1.") and self.loop.version < self.until and not self.loop.stop.is_set():
                await asyncio.sleep(0.001)
            return await real(action)

        s.step = step
        return s


@pytest.mark.parametrize("drop_stale", [False, True])
def test_a_group_that_finishes_late_is_trained_stale_as_released_or_dropped_when_asked(drop_stale):
    """Admission bounds what starts (max_staleness 1), not what finishes: group 0 ends 3 versions after it started.
    As released it is trained with staleness 3 (its importance weights correct it); with drop_stale it is dropped
    and counted, no trained step is staler than the bound, and its screenshots are freed."""
    store = env.ScreenshotStore()
    envs = Held(store, until=3)
    loop, learner, *_ = make_loop(store, envs=envs, updates=8, workers=4, group_size=2, batch_groups=1,
                                  max_staleness=1, dynamic_sampling=False, drop_stale=drop_stale)
    envs.loop = loop
    loop.run()
    late = {t.id for t in loop.pool.trajectory_log if t.group == 0}
    trained = {tid: version - min(vs) for batch in learner.batches for version, tid, vs in batch}
    ledger = loop.ledger()
    assert ledger["finished"] == ledger["trained"] + ledger["rejected"] + ledger["dropped_stale"] + \
        ledger["abandoned"] + ledger["leftover"]
    assert ledger["leftover"] == ledger["in_buffer"] + ledger["in_open_groups"]
    if drop_stale:
        # group 0 is dropped, with both its trajectories (on a loaded machine another group may age past the bound)
        assert not late & set(trained) and ledger["dropped_stale"] == 2 * loop.stats.groups_dropped >= 2
        assert max(trained.values()) <= 1 and max(m["staleness_max"] for m in loop.history) <= 1
        assert not any(k.startswith("g0.") for k in store._bytes)
    else:
        assert late <= set(trained) and min(trained[t] for t in late) >= 3 and ledger["dropped_stale"] == 0
        assert max(m["staleness_max"] for m in loop.history) >= 3  # the metric reports what was trained


def test_a_group_abandoned_after_a_sibling_finished_is_counted_once_and_freed(capsys):
    """In groups 0 and 1 the second episode fails only after its sibling has finished (an event), every time it is
    retried: each group is abandoned with the sibling's finished trajectory in it, which is counted abandoned (not
    trained, not lost); their screenshots are freed, no worker dies, and no other group is left waiting."""
    store = env.ScreenshotStore()
    doomed = (0, 1)

    async def fails_after_sibling(task, episode):
        group = int(episode[1:].split(".")[0])
        if group in doomed and episode.split(".")[1] == "1":
            while group in loop.pool.open and not loop.pool.open[group].trajectories:
                await asyncio.sleep(0.001)
            raise RuntimeError("the page died after its sibling finished")

    envs = FakeEnvs(store, length=constant(1), before_reset=fails_after_sibling)
    loop, learner, *_ = make_loop(store, envs=envs, updates=6, workers=4, group_size=2, batch_groups=1,
                                  slot_retries=2, dynamic_sampling=False)
    loop.run()
    ledger, stats = loop.ledger(), loop.stats
    siblings = [t for t in loop.pool.trajectory_log if t.group in doomed]
    assert len(siblings) == 2 and stats.faults == 4 and ledger["abandoned"] == 2  # each retried once
    assert not {t.id for t in siblings} & {tid for batch in learner.batches for _, tid, _ in batch}
    assert ledger["finished"] == ledger["trained"] + ledger["rejected"] + ledger["dropped_stale"] + \
        ledger["abandoned"] + ledger["leftover"] and ledger["trained"] == 6 * 2
    assert not any(k.startswith(("g0.", "g1.")) for k in store._bytes) and not set(doomed) & set(loop.pool.open)
    assert loop.pool.held == sum(len(g.trajectories) for g in loop.pool.open.values())  # the admission's count
    assert " died: " not in capsys.readouterr().out  # abandoning never raised inside a worker (it would be replaced)
    newest = max(g for g in loop.pool.open) if loop.pool.open else 0
    assert all(g >= newest - 4 for g in loop.pool.open)  # no admitted group lost its waiting slots


def test_a_group_whose_every_episode_fails_is_abandoned_once(capsys):
    """Both episodes of group 0 fail while both run (an event: each waits for the other to start): the second
    failure finds the group already given up, which must be neither an error nor a second count."""
    store = env.ScreenshotStore()
    started = set()

    async def both_fail(task, episode):
        if episode.startswith("g0."):
            started.add(episode)
            while len(started) < 2 and not loop.stop.is_set():
                await asyncio.sleep(0.001)
            raise RuntimeError("both pages of group 0 die")

    envs = FakeEnvs(store, length=constant(1), before_reset=both_fail)
    loop, learner, *_ = make_loop(store, envs=envs, updates=3, workers=4, group_size=2, batch_groups=1,
                                  slot_retries=1, dynamic_sampling=False)
    loop.run()
    assert " died: " not in capsys.readouterr().out
    assert loop.stats.faults == 2 and loop.stats.abandoned == 0 and loop.stats.trained == 3 * 2
    assert all(t.group != 0 for t in loop.pool.trajectory_log) and 0 not in loop.pool.open


def _traj(tid, group, reward, tokens, versions, errors=()):
    steps = [aloop.Step(None, pol_mod.Sample("", [7] * n, [-1.0] * n, v, False), "syntax" if k in errors else None)
             for k, (n, v) in enumerate(zip(tokens, versions))]
    return aloop.Trajectory(tid, group, "t", 0, f"e{tid}", steps, reward=reward)


def test_per_update_metrics_by_hand():
    """The numbers behind figs. 2-4 and the staleness columns, worked by hand: a success in 2 steps (3 and 5
    tokens), a failure in 3 steps (2 tokens each, one malformed), a partial reward 0.5 in 1 step (4 tokens), which
    counts as a success (reward > 0), sampled at versions 4-5, 3-4 and 5, trained at version 6."""
    a = _traj(0, 0, 1.0, [3, 5], [4, 5])
    b = _traj(1, 0, 0.0, [2, 2, 2], [3, 3, 4], errors=(1,))
    c = _traj(2, 1, 0.5, [4], [5])
    m = aloop.rollout_metrics([a, b, c])
    assert m == dict(rollout_trajectories=3, rollout_success=pytest.approx(2 / 3), rollout_steps=2.0,
                     rollout_steps_success=1.5, rollout_steps_failure=3.0, rollout_tokens_per_step=3.0)
    groups = [aloop.Group(0, None, 0, [a, b]), aloop.Group(1, None, 0, [c])]
    m = aloop.batch_metrics(groups, version=6)
    assert m == dict(success=pytest.approx(2 / 3), trajectories=3, samples=6, steps=2.0, steps_success=1.5,
                     steps_failure=3.0, tokens_per_step=3.0, invalid_actions=pytest.approx(1 / 6),
                     staleness_mean=2.0, staleness_max=3)
    empty = aloop.rollout_metrics([])
    assert empty["rollout_trajectories"] == 0 and all(v != v for k, v in empty.items() if k != "rollout_trajectories")


def test_the_stall_warning_reaches_a_piped_log_while_the_run_is_still_going(tmp_path):
    """A training log is usually a pipe or a file, which Python buffers in blocks: the pool's warning must be
    flushed when it is said, not when the process exits. A child process runs a loop that stalls (every group
    rejected); the warning must arrive while the child is still running."""
    import os
    import selectors
    import subprocess
    import sys

    script = tmp_path / "stall.py"
    script.write_text("import test_04_async_loop as t\n"
                      "store = t.env.ScreenshotStore()\n"
                      f"loop, *_ = t.make_loop(store, envs=t.FakeEnvs(store, p_success=0.0), updates=2, "
                      f"weights_dir={str(tmp_path / 'w')!r})\n"
                      "loop.run()\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as most machines are
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             env={**environ, "PYTHONPATH": os.pathsep.join([tests, str(ROOT)])}, text=True,
                             cwd=ROOT)  # (mutmut's stats mode reads its config there)
    try:
        selector = selectors.DefaultSelector()
        selector.register(child.stdout, selectors.EVENT_READ)
        deadline, line = time.monotonic() + WATCHDOG_S / 2, ""  # the child runs until its watchdog, at least
        while "groups were rejected" not in line and time.monotonic() < deadline and child.poll() is None:
            if selector.select(timeout=0.5):
                line = child.stdout.readline()
        assert "groups were rejected" in line, "no warning arrived while the run was stalled"
        assert child.poll() is None  # it came while the run was still going, not at exit
    finally:
        child.kill()
        child.wait()


def test_the_task_sampler_follows_the_seed():
    """Which task and which instance seed each group gets comes from cfg.seed alone: a rerun (or a resume, which
    restores this generator) draws the same sequence; another seed draws another. Every task once per round."""
    def draws(seed):
        pool = make_loop(seed=seed)[0].pool
        return [(pool._next_task().id, pool.rng.randrange(env.TRAIN_SEEDS)) for _ in range(3 * len(TASKS))]

    assert draws(3) == draws(3) and draws(3) != draws(4)
    first_round = [task for task, _ in draws(3)[:len(TASKS)]]
    assert sorted(first_round) == sorted(t.id for t in TASKS)


def test_the_admission_rule_by_hand():
    """A new episode starts only while running + accepted < (max_staleness + version + 1) * B * G (trajectories;
    a dropped group's no longer count as accepted), the buffer has room, and no drain is under way."""
    loop, *_ = make_loop(max_staleness=1, batch_groups=1, group_size=2)
    pool = loop.pool  # B G = 2: at version 0 the bound is (1 + 0 + 1) * 2 = 4
    pool.accepted, pool.in_flight = 2, 1
    assert pool._admit()  # 1 + 2 < 4
    pool.in_flight = 2
    assert not pool._admit()  # 2 + 2 = 4
    pool.stats.dropped_stale = 2  # a dropped group frees its admission: 2 + 0 < 4
    assert pool._admit()
    pool.open[7] = aloop.Group(7, None, 0)
    pool._finish(pool.open[7], _traj(0, 7, 0.0, [1], [0]))  # a finished member waits for its sibling
    assert pool._admit()  # running = 2 in flight + 1 waiting: 3 + 0 < 4
    pool.stats.dropped_stale = 0
    assert not pool._admit()  # 3 + 2 = 5
    loop.version = 2  # (1 + 2 + 1) * 2 = 8 > 5
    assert pool._admit()
    pool.draining = True
    assert not pool._admit()
    pool.draining = False
    for g in range(loop.buffer.capacity):  # a full buffer: back-pressure
        loop.buffer.put(aloop.Group(g, None, 0, []))
    assert loop.buffer.capacity == 2 and not pool._admit()


@pytest.mark.parametrize("mode, bound", [("async", 2), ("sync", 0)])
def test_drop_stale_drops_exactly_the_groups_older_than_the_bound(mode, bound):
    """With drop_stale the trainer drops a group whose oldest step is more than max_staleness (async; 0 in sync)
    versions behind it, counts it and frees it, and trains every other group, in the order they finished."""
    loop, *_ = make_loop(mode=mode, max_staleness=2, batch_groups=3, group_size=1, drop_stale=True)
    loop.version = 5
    ages = [0, bound, bound + 1, bound + 2, 1 if bound else 0, bound + 3]  # staleness of six groups, as finished
    for g, age in enumerate(ages):
        loop.store.put(f"e{g}", b"jpeg")
        loop.buffer.put(aloop.Group(g, None, 0, [_traj(g, g, 1.0, [1, 1], [5 - age, 5])]))
    watchdog = threading.Timer(WATCHDOG_S, loop.stop.set)  # a bound that drops too many would wait for ever
    watchdog.start()
    fresh = loop._take_fresh_groups()
    watchdog.cancel()
    assert fresh is not None and [g.id for g in fresh] == [0, 1, 4]  # 2 and 3 dropped on the way; 5 still waits
    assert loop.stats.groups_dropped == loop.stats.dropped_stale == 2 and not loop.store.keys("e2")
    assert not loop.store.keys("e3") and loop.store.keys("e0") and len(loop.buffer) == 1


def test_each_slot_of_a_group_is_admitted_but_a_retried_slot_goes_at_once():
    """A new group needs admission, and so does each of its slots waiting in the queue; a slot being retried after
    its env failed was admitted when it first started, so it goes at once even while admission is closed (here by
    the drain ablation around a refresh). Deterministic: with admission closed, _next_slot never returns."""
    async def scenario():
        loop, *_ = make_loop(group_size=2)
        pool = loop.pool
        pool.loop, pool._changed = asyncio.get_running_loop(), asyncio.Event()
        pool.draining = True  # admission closed
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool._next_slot(), 0.2)
        assert not pool.open and not pool.slots  # no group started while closed
        group = aloop.Group(0, TASKS[0], 0)
        pool.open[0] = group
        pool.slots.append((group, 0, 0))  # the second slot of a started group
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool._next_slot(), 0.2)
        pool.slots.appendleft((group, 1, 1))  # a slot retried once
        assert await asyncio.wait_for(pool._next_slot(), 5) == (group, 1, 1)
        pool.draining = False  # open again: the waiting slot goes, before any new group is made
        assert await asyncio.wait_for(pool._next_slot(), 5) == (group, 0, 0) and list(pool.open) == [0]

    asyncio.run(scenario())


def test_a_trajectory_that_finishes_after_its_group_was_abandoned_is_counted_once_and_freed():
    """In groups 0 and 1, episode 0 fails (once: slot_retries 1) while its sibling is running; the group is given
    up, and the sibling, which waits for that (an event), finishes afterwards: it is counted abandoned, once, its
    screenshots are freed, and the ledger balances."""
    store = env.ScreenshotStore()
    doomed, started = (0, 1), set()

    async def fail_while_sibling_runs(task, episode):
        group, j = (int(x) for x in episode[1:].split(".")[:2])
        if group in doomed:
            started.add((group, j))
            if j == 0:
                while (group, 1) not in started and not loop.stop.is_set():
                    await asyncio.sleep(0.001)
                raise RuntimeError("the page died while its sibling was running")
            while group in loop.pool.open and not loop.stop.is_set():
                await asyncio.sleep(0.001)

    envs = FakeEnvs(store, length=constant(1), before_reset=fail_while_sibling_runs)
    loop, learner, *_ = make_loop(store, envs=envs, updates=4, workers=4, group_size=2, batch_groups=1,
                                  slot_retries=1, dynamic_sampling=False)
    loop.run()
    ledger = loop.ledger()
    late = [t for t in loop.pool.trajectory_log if t.group in doomed]
    assert len(late) == 2 and ledger["abandoned"] == 2 and loop.stats.faults == 2
    assert ledger["finished"] == ledger["trained"] + ledger["rejected"] + ledger["dropped_stale"] + \
        ledger["abandoned"] + ledger["leftover"] and ledger["trained"] == 4 * 2
    assert not any(k.startswith(("g0.", "g1.")) for k in store._bytes)
    assert loop.pool.held == sum(len(g.trajectories) for g in loop.pool.open.values())  # the admission's count


def test_rejected_groups_are_counted_and_the_stall_count_restarts_after_an_accepted_group(capsys):
    """Dynamic sampling, by hand: a group with equal rewards is rejected (counted as a group and as its
    trajectories, freed); one with different rewards goes to the buffer as it is (by reference: screenshots by
    value is an ablation) and restarts the count of rejections in a row, so the stall warning needs 20 more."""
    loop, *_ = make_loop(group_size=2, batch_groups=1)
    pool = loop.pool

    def finish(gid, rewards):
        group = aloop.Group(gid, TASKS[0], 0)
        pool.open[gid] = group
        for j, reward in enumerate(rewards):
            pool._finish(group, _traj(2 * gid + j, gid, reward, [1], [0]))
        return group

    for gid in range(5):
        finish(gid, [0.0, 0.0])
    accepted = finish(5, [1.0, 0.0])
    assert loop.buffer._groups[-1] is accepted and pool.accepted == 2
    for gid in range(6, 25):
        finish(gid, [1.0, 1.0])
    assert "were rejected" not in capsys.readouterr().out  # 19 in a row since the accepted one
    finish(25, [0.0, 0.0])
    assert "the last 20 groups were rejected" in capsys.readouterr().out
    assert loop.stats.groups_rejected == 25 and loop.stats.rejected == 50 and loop.stats.finished == 52


def test_a_failure_of_either_thread_stops_the_loop_with_its_traceback():
    """The rollout thread's failure (the envs cannot start) and a bad mode are errors that say what went wrong."""
    class Broken(FakeEnvs):
        async def start(self):
            raise OSError("chromium is not installed")

    store = env.ScreenshotStore()
    loop, *_ = make_loop(store, envs=Broken(store))
    with pytest.raises(RuntimeError, match="^the loop failed:\n(.|\n)*OSError: chromium is not installed"):
        loop.run()
    with pytest.raises(ValueError, match="mode must be 'async' or 'sync', got 'fast'"):
        make_loop(mode="fast")


def test_every_update_row_has_its_timing_its_counters_and_reaches_on_update_with_its_groups():
    """The trainer thread's own part of a metrics row (fig. 1's samples/s, the ledger's counters) and what it hands
    to on_update (logging, checkpoints): the groups just trained, in the order trained."""
    handed = []
    loop, learner, *_ = make_loop(updates=4)
    loop.on_update = lambda m, groups: handed.append([t.id for g in groups for t in g.trajectories])
    history = loop.run()
    assert [m["version"] for m in history] == [1, 2, 3, 4]
    times = [m["time_s"] for m in history]
    assert times == sorted(times) and all(m["update_s"] > 0 for m in history)
    assert sum(m["update_s"] for m in history) <= times[-1] + 1e-6  # the updates' durations tile the run
    assert all(m["samples_per_s"] == pytest.approx(m["samples"] / m["update_s"]) for m in history)
    assert history[-1]["trained"] == loop.stats.trained == 4 * 2 * 2 and history[-1]["groups_trained"] == 4 * 2
    assert loop.trained_ids == [i for ids in handed for i in ids] and len(loop.trained_ids) == loop.stats.trained


def test_an_episode_acts_on_what_the_model_wrote_and_records_it():
    """Each step: the sampler sees the agent's state (memory so far), a valid reply reaches the env as its Action, an
    invalid one as its raw text and a truncated one as nothing (the env reports it, the step is spent), and the
    trajectory records the reply's error, its task, seed and times. Replies cycle: valid, unknown action, truncated."""
    replies = [("Memory: a\nAction: click(#0)", False), ("Memory: b\nAction: jump(#1)", False),
               ("Memory: c\nAction: click(#0)", True)]

    class Scripted(FakeSampler):
        def __init__(self):
            super().__init__()
            self.memories, self.n = [], 0

        def turn(self, obs, state):
            self.memories.append(state.memory)
            return super().turn(obs, state)

        def sample(self, turns, store):
            out = []
            for s in super().sample(turns, store):
                text, truncated = replies[self.n % 3]
                self.n += 1
                out.append(pol_mod.Sample(text, s.token_ids, s.logprobs, s.version, truncated))
            return out

    class Recording(FakeEnvs):
        def slot(self, i):
            s = super().slot(i)
            real, s.sent = s.step, []

            async def step(action):
                s.sent.append(action)
                return await real(action)

            s.step = step
            return s

    store = env.ScreenshotStore()
    envs, sampler = Recording(store, length=constant(3)), Scripted()
    loop, *_ = make_loop(store, envs=envs, sampler=sampler, updates=2, workers=1, group_size=2, batch_groups=1,
                         dynamic_sampling=False)
    loop.run()
    sent = [a for s in envs.slots for a in s.sent]
    assert sent[:3] == [env.Action("click", mark=0), "jump(#1)", ""] and len(sent) >= 6  # truncated: nothing to act on
    first = loop.pool.trajectory_log[0]
    assert [s.action_error for s in first.steps] == [None, "unknown_action", "truncated"]
    assert sampler.memories[:3] == ["", "a", "a"]  # the memory of a valid reply is kept; an invalid one's is not
    for t in loop.pool.trajectory_log:  # the task and the seed its env was reset with, and why it ended
        assert (t.episode, t.task, t.seed) in envs.reset_log and 0 < t.t_start <= t.t_end and t.end == "task_done"
    assert len(loop.pool.trajectory_log) <= loop.stats.started <= len(loop.pool.trajectory_log) + 1  # + one cut short


def test_a_worker_that_dies_anyway_is_replaced_and_says_so(capsys):
    """A failure outside the episode (here: handing a finished trajectory to its group, once) kills its worker; the
    pool replaces it, says so, and training goes on to the end."""
    loop, *_ = make_loop(updates=3, workers=4)
    finish, failed = loop.pool._finish, []

    def finish_or_fail_once(group, traj):
        if not failed:
            failed.append(traj.id)
            raise RuntimeError("bookkeeping bug")
        return finish(group, traj)

    loop.pool._finish = finish_or_fail_once
    history = loop.run()
    assert len(history) == 3 and failed
    died = [line for line in capsys.readouterr().out.splitlines() if " died: " in line]
    assert len(died) == 1 and "RuntimeError('bookkeeping bug')" in died[0] and died[0].endswith("; replaced")
