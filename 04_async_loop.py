"""04 - The asynchronous loop: rollout, gradient update and policy refresh overlap.

    rollout thread (asyncio)                                   trainer thread
    ------------------------                                   --------------
    N episode workers, each forever:                           forever:
      take the next slot of a task group (admission control)     take B complete groups
      reset -> [turn -> batched inference -> env.step]* -> done  recompute pi_prox, GRPO loss (03), optimizer step
      hand the trajectory to its group; a full group goes        version += 1, write the weights to files; the
      to the GroupBuffer (or is rejected: no signal)             sampler loads them between two batches and
    one inference server: every worker waiting for an action     must hold exactly what was written (the pool
      is served by one batched sampler call per tick (an         keeps running: the next batch uses them)
      engine that batches by itself, vLLM, gets one request
      per step instead)

Why threads, in one process: the rollout side is I/O (a browser per episode, driven by async Playwright, so one
asyncio loop runs all N episodes) plus inference; the trainer is a long torch computation. torch releases the GIL
inside its kernels, so a trainer thread and a rollout thread do overlap, and sharing one process means the
sampler's weights, the screenshot store and the buffer are plain Python objects: screenshots stay in the store
and only keys move (the paper's lightweight screenshot handling). The engine may live elsewhere: vLLM's engine core
runs in its own process, and so does 02's transformers engine with `--engine hf-process` (asyncwebrl/
engine_process.py), so that sampling and training stop taking turns at one interpreter; the pool then sends one
request per episode step, as to vLLM. Extra processes for several GPUs belong to 05_train.py, not to this file.

The everlasting pool: workers are never drained at an iteration boundary. A weight refresh lands between two
steps of a running episode; every step records the policy version that produced it, so one trajectory may span
versions. Staleness is bounded at admission, as in the released code: a new episode starts only while
    running + accepted  <  (max_staleness + version + 1) * B * G        (trajectories)
Groups finish out of order, so admission alone does not bound the staleness of what is trained: a long episode
admitted at version v may finish after later groups were trained. The released code trains it anyway and lets the
importance weight pi_prox / pi_behave (tokens above 5 dropped, 03) correct or discard its stale tokens; so does
this loop by default. `drop_stale=True` instead drops a group whose oldest step is more than max_staleness versions
behind the trainer when it is consumed; that removes long trajectories first (the long failures 1/k is about).

The synchronous baseline is the same code with `mode="sync"`: no episode starts until the sampler has the
trainer's current weights, and exactly B accepted groups are rolled out per version (rollout all -> train ->
refresh), so the pool idles while the trainer works and the trainer idles while the slowest episode finishes.

Faults are not rewards: an episode ended by the environment or the judge (a hung or crashed page, a dead browser,
a failed judge: 01.FAULT_ENDS) never reaches a group; its slot runs again (asyncwebrl/faults.py), and the ledger
counts it under its end reason.

Run `python 04_async_loop.py` for a short async run and a short sync run with the real browser and the tiny model.
In the package: the records that flow from pool to trainer and the ledger's counters (asyncwebrl/records.py), what a
worker does on a fault (faults.py), the learner the trainer thread calls (learner.py: pi_prox, minibatches, 03's
loss), the batched inference of the transformers sampler (batching.py), the per-update metrics (metrics.py) and the
Timeline of timed spans behind utilisation and the Gantt figure (timeline.py). Changed from the released code:
threads in one process instead of separate services (the CPU pipeline; 05_train.py places the engine and the
trainer on their own GPUs), and no stale-group drop unless asked (above).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import random
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from asyncwebrl import faults, load, weights
from asyncwebrl.batching import Batcher
from asyncwebrl.faults import EpisodeFault
from asyncwebrl.learner import Learner, LearnerConfig, StepImages, by_value, release_heap  # noqa: F401 (tests, 05)
from asyncwebrl.metrics import batch_metrics, rollout_metrics
from asyncwebrl.records import Group, Stats, Step, Trajectory, free_group
from asyncwebrl.timeline import Timeline

env = load("01_env")
policy_mod = load("02_policy")


@dataclass
class LoopConfig:
    mode: str = "async"  # "async": everlasting pool + overlapped trainer; "sync": rollout all -> train -> refresh
    workers: int = 8  # N concurrent episodes (browser pages)
    group_size: int = 4  # G trajectories of the same task instance (same task, same seed) per GRPO group
    batch_groups: int = 2  # B groups per update
    max_staleness: int = 2  # admission bound on version lag (paper: 2); sync mode is 0 by design
    drop_stale: bool = False  # also drop groups older than max_staleness when consumed (the released code does not)
    dynamic_sampling: bool = True  # reject groups whose rewards are all equal (zero GRPO signal), as the paper
    buffer_groups: int | None = None  # bound on complete groups waiting; None = (max_staleness + 1) * B
    updates: int = 10  # stop after this many updates
    max_inference_batch: int = 64  # cap on replies per sampler call
    slot_retries: int = 2  # an episode slot whose env raises this many times abandons its group
    # ablations of the paper's two system adaptations (`python -m experiments.compare_sync`):
    drain: bool = False  # no everlasting pool: before each refresh, stop starting episodes and wait for all to end
    screenshots_by_value: bool = False  # no lightweight screenshots: groups carry the bytes, serialised (pickled)
    weights_dir: str = ""  # where each refresh's weight files go (asyncwebrl/weights.py); "" = a fresh RAM folder
    seed: int = 0  # seeds the task order and the task instances (MiniWoB++ seeds)


# ----------------------------------------------------------------------------------------------------------------
# The group buffer: complete groups wait here for the trainer. Bounded (back-pressure: the pool's admission reads
# its length), thread-safe (the pool puts from the rollout thread, the trainer takes from its own).


class GroupBuffer:
    def __init__(self, capacity: int):
        self.capacity = capacity  # groups; the pool admits no new episode while the buffer is full
        self._groups: collections.deque[Group] = collections.deque()
        self._cond = threading.Condition()

    def put(self, group: Group) -> None:
        with self._cond:
            self._groups.append(group)
            self._cond.notify_all()

    def take(self, n: int, stop: threading.Event) -> list[Group] | None:
        """Wait for n groups (oldest first); None if `stop` is set first."""
        with self._cond:
            while len(self._groups) < n:
                if stop.is_set():
                    return None
                self._cond.wait(0.05)
            return [self._groups.popleft() for _ in range(n)]

    def __len__(self) -> int:
        with self._cond:
            return len(self._groups)


# ----------------------------------------------------------------------------------------------------------------
# The rollout side


class RolloutPool:
    """N workers on one asyncio loop (run in the rollout thread), plus the inference server that batches them."""

    def __init__(self, cfg: LoopConfig, envs, sampler, tasks: list, store, buffer: GroupBuffer, timeline: Timeline,
                 stats: Stats, trainer_version):
        self.cfg, self.envs, self.sampler, self.tasks, self.store = cfg, envs, sampler, tasks, store
        self.buffer, self.timeline, self.stats, self.trainer_version = buffer, timeline, stats, trainer_version
        self.rng = random.Random(cfg.seed)
        self.slots: collections.deque = collections.deque()  # (group, index, retries) waiting for a worker
        self.open: dict[int, Group] = {}  # groups with trajectories still running or waiting for siblings
        self.group_ids, self.traj_ids = itertools.count(), itertools.count()
        self.in_flight = 0  # episodes running now
        self.held = 0  # finished trajectories in open groups, waiting for their siblings (counted, not summed: at
        # the paper's scale _admit runs ~10^5 times an update and a sum over open groups dominated the pool's CPU)
        self.accepted = 0  # trajectories in groups accepted into the buffer, ever
        self.batcher: Batcher | None = None  # made in run(), in the pool's event loop
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping = False
        self.trajectory_log: list[Trajectory] = []  # every finished trajectory, in order (tests, inspection)
        self.order: list = []  # tasks left in this round
        self.draining = False  # drain ablation: set by the trainer around a refresh
        self.rejected_in_a_row = 0  # groups rejected since the last accepted one (a stalled loop says so)

    # -- scheduling ---------------------------------------------------------------------------------------------
    def _next_task(self):
        """Tasks in shuffled rounds, so that every task is seen once per round."""
        if not self.order:
            self.order = self.rng.sample(self.tasks, len(self.tasks))
        return self.order.pop()

    def _admit(self) -> bool:
        c = self.cfg
        if self.draining:
            return False
        batch = c.batch_groups * c.group_size
        running = self.in_flight + self.held
        accepted = self.accepted - self.stats.dropped_stale  # a dropped group frees its admission
        version = self.trainer_version()
        if c.mode == "sync":  # only the current weights, and exactly one batch per version
            return self.sampler.version == version and running + accepted < (version + 1) * batch
        return (running + accepted < (c.max_staleness + version + 1) * batch
                and len(self.buffer) < self.buffer.capacity)

    def wake(self) -> None:
        """Something changed (episode done, new version, groups consumed): let waiting workers re-check."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._changed.set)

    async def _next_slot(self):
        while not self.stopping:
            if self.slots and (self.slots[0][2] > 0 or self._admit()):  # a retried slot was already admitted
                return self.slots.popleft()
            if not self.slots and self._admit():
                group = Group(next(self.group_ids), self._next_task(), self.rng.randrange(env.TRAIN_SEEDS))
                self.open[group.id] = group
                # the G slots of a group are handed out one after another, so its episodes run side by side
                # and the group completes as soon as its slowest member does
                self.slots.extend((group, j, 0) for j in range(self.cfg.group_size))
                continue
            self._changed.clear()
            await self._changed.wait()
        return None

    # -- workers ------------------------------------------------------------------------------------------------
    async def _worker(self, i: int):
        slot_env = self.envs.slot(i)
        try:
            while (slot := await self._next_slot()) is not None:
                group, j, retries = slot
                self.in_flight += 1
                self.stats.started += 1
                try:
                    traj = await self._episode(i, slot_env, group, j)
                except asyncio.CancelledError:  # the loop stopped mid-episode
                    self.stats.cut += 1
                    raise
                except faults.EngineDead:  # not this episode's fault: the pool stops (faults.replace_dead)
                    self.stats.cut += 1
                    raise
                except Exception as e:  # the environment's or the judge's fault, not the agent's: never trained
                    slot_env = await faults.on_fault(self, i, slot_env, slot, e)  # run the slot again (or give up)
                    continue
                finally:
                    self.in_flight -= 1
                    self.wake()
                self._finish(group, traj)
        finally:
            await faults.quiet_close(slot_env)

    async def _episode(self, i: int, slot_env, group: Group, j: int) -> Trajectory:
        traj = Trajectory(next(self.traj_ids), group.id, group.task.id, group.seed,
                          episode=f"g{group.id}.{j}.{self.stats.started}", t_start=time.perf_counter())
        try:
            with self.timeline.span(f"env/{i}", "reset"):
                obs = await slot_env.reset(group.task, seed=group.seed, episode=traj.episode)
            state = policy_mod.AgentState()
            while True:
                turn = self.sampler.turn(obs, state)
                sample = await self._infer(turn)
                reply = policy_mod.parse_response(sample.text, sample.truncated)
                with self.timeline.span(f"env/{i}", "step"):
                    result = await slot_env.step(reply.action if reply.action is not None else reply.action_text)
                traj.steps.append(Step(turn, sample, reply.error, marks=tuple(e.box for e in obs.elements)))
                policy_mod.update_state(state, obs, reply, result)
                obs = result.obs
                if result.done:
                    traj.reward, traj.end, traj.t_end = result.reward, result.info.get("end", ""), time.perf_counter()
                    if traj.end in env.FAULT_ENDS:
                        raise EpisodeFault(traj.end, result.info)
                    return traj
        except BaseException:
            self.store.free(traj.episode)
            raise

    def _finish(self, group: Group, traj: Trajectory) -> None:
        self.stats.finished += 1
        self.trajectory_log.append(traj)
        if group.id not in self.open:  # the group was abandoned meanwhile
            self.stats.abandoned += 1
            self.store.free(traj.episode)
            return
        group.trajectories.append(traj)
        self.held += 1
        if len(group.trajectories) < self.cfg.group_size:
            return
        del self.open[group.id]
        self.held -= len(group.trajectories)
        rewards = {t.reward for t in group.trajectories}
        if self.cfg.dynamic_sampling and len(rewards) == 1:  # no GRPO signal: reject, free, sample another group
            self.stats.groups_rejected += 1
            self.stats.rejected += len(group.trajectories)
            free_group(self.store, group)
            faults.warn_if_stalled(self, rewards.pop())
            return
        self.rejected_in_a_row = 0
        self.accepted += len(group.trajectories)
        self.buffer.put(by_value(group, self.store) if self.cfg.screenshots_by_value else group)

    # -- inference: one request per episode step ------------------------------------------------------------------
    async def _infer(self, turn):
        if hasattr(self.sampler, "asample"):  # an engine that batches continuously itself (vLLM): one request each
            sample = await self.sampler.asample(turn, self.store)
            self.stats.inference_replies += 1
            return sample
        return await self.batcher.infer(turn)  # transformers: every waiting step joins the next batched call

    # -- lifetime -----------------------------------------------------------------------------------------------
    async def run(self, stop: threading.Event):
        self.loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.batcher = Batcher(self.sampler, self.store, self.cfg.max_inference_batch, self.timeline, self.stats)
        await self.envs.start()
        if hasattr(self.sampler, "start"):  # an engine that batches by itself (vLLM, or 02's in its own process)
            self.sampler.timeline = self.timeline  # where it records its batches, if it can see them
            await self.sampler.start()
        tasks = [asyncio.create_task(self._worker(i)) for i in range(self.cfg.workers)]
        server = asyncio.create_task(self.batcher.serve())
        try:
            while not stop.is_set():
                faults.replace_dead(tasks, self._worker)
                await asyncio.sleep(0.02)
        finally:
            self.stopping = True
            for t in tasks + [server]:
                t.cancel()
            await asyncio.gather(*tasks, server, return_exceptions=True)
            self.batcher.close()
            await self.envs.close()
            if hasattr(self.sampler, "close"):
                self.sampler.close()


# ----------------------------------------------------------------------------------------------------------------
# The loop: the rollout thread, the trainer thread, and the main thread that watches them.


class Loop:
    """Wires the pool (rollout thread) to the learner (trainer thread). `run()` blocks until cfg.updates updates."""

    def __init__(self, cfg: LoopConfig, envs, sampler, learner, tasks: list, store, on_update=None):
        if cfg.mode not in ("async", "sync"):
            raise ValueError(f"mode must be 'async' or 'sync', got {cfg.mode!r}")
        self.cfg, self.sampler, self.learner, self.store = cfg, sampler, learner, store
        self.version = sampler.version  # the trainer's version; the sampler catches up at each refresh
        self.stats, self.timeline = Stats(), Timeline()
        self.buffer = GroupBuffer(cfg.buffer_groups or (cfg.max_staleness + 1) * cfg.batch_groups)
        self.pool = RolloutPool(cfg, envs, sampler, tasks, store, self.buffer, self.timeline, self.stats,
                                trainer_version=lambda: self.version)
        self.on_update = on_update or (lambda metrics, groups: None)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.trained_ids: list[int] = []  # trajectory ids, in the order trained
        self.history: list[dict] = []
        self.weights_root: Path | None = None  # made at the first refresh

    # -- trainer thread -----------------------------------------------------------------------------------------
    def _take_fresh_groups(self) -> list[Group] | None:
        c, fresh = self.cfg, []
        limit = 0 if c.mode == "sync" else c.max_staleness
        while len(fresh) < c.batch_groups:
            with self.timeline.span("trainer", "idle"):
                got = self.buffer.take(1, self.stop)
            if got is None:  # stopped: what was taken goes back, so that the ledger counts it and run() frees it
                for g in fresh:
                    self.buffer.put(g)
                return None
            group = got[0]
            if c.drop_stale and group.staleness(self.version) > limit:  # opt-in: too old to be trusted
                self.stats.groups_dropped += 1
                self.stats.dropped_stale += len(group.trajectories)
                free_group(self.store, group)
            else:
                fresh.append(group)
            self.pool.wake()  # the buffer shrank: admission may open
        return fresh

    def _trainer(self):
        try:
            t_last, seen = time.perf_counter(), len(self.pool.trajectory_log)
            while self.version < self.cfg.updates and not self.stop.is_set():
                groups = self._take_fresh_groups()
                if groups is None:
                    return
                metrics = batch_metrics(groups, self.version)
                with self.timeline.span("trainer", "train", version=self.version):
                    metrics.update(self.learner.update(groups))
                self.trained_ids += [t.id for g in groups for t in g.trajectories]
                self.stats.trained += metrics["trajectories"]
                self.stats.groups_trained += len(groups)
                self.version += 1
                if self.cfg.drain:  # the ablation: no episode may span the refresh, so wait for all to end
                    self.pool.draining = True
                    with self.timeline.span("trainer", "drain"):
                        while self.pool.in_flight and not self.stop.is_set():
                            time.sleep(0.005)
                with self.timeline.span("trainer", "refresh", version=self.version):
                    self._refresh()
                self.pool.draining = False
                self.pool.wake()
                now = time.perf_counter()
                metrics.update(version=self.version, update_s=now - t_last, time_s=now - self.timeline.t0,
                               samples_per_s=metrics["samples"] / (now - t_last), **self.stats.row())
                finished = self.pool.trajectory_log[seen:]  # the rollout thread only appends
                metrics.update(rollout_metrics(finished))
                t_last, seen = now, seen + len(finished)
                self.history.append(metrics)
                self.on_update(metrics, groups)  # logging, checkpoints: screenshots are still in the store
                for g in groups:
                    free_group(self.store, g)
                release_heap()  # what this update's tensors freed goes back to the system (learner.py says why)
        except BaseException:
            self.errors.append(traceback.format_exc())
        finally:
            self.stop.set()

    def _refresh(self) -> None:
        """The trainer writes the new weights to files, the engine loads them between two batches and says what it
        holds; a refresh that did not land stops the run (training on replies of old weights would be silent)."""
        if self.weights_root is None:
            self.weights_root = Path(self.cfg.weights_dir) if self.cfg.weights_dir else weights.default_root()
        folder = self.weights_root / f"v{self.version}"
        wrote = self.learner.publish(folder, getattr(self.sampler, "weights_dtype", None))
        held = self.sampler.load_weights(str(folder), self.version)  # one digest per engine
        if not held or any(h != wrote for h in held):
            raise RuntimeError(f"refresh check failed at version {self.version}: the trainer wrote weights "
                               f"{wrote}, the engine(s) hold {held}")
        self.stats.refreshes_checked += 1
        shutil.rmtree(folder, ignore_errors=True)  # every engine has its copy now

    # -- rollout thread -----------------------------------------------------------------------------------------
    def _rollout(self):
        try:
            asyncio.run(self.pool.run(self.stop))
        except BaseException:
            self.errors.append(traceback.format_exc())
            self.stop.set()

    def run(self) -> list[dict]:
        threads = [threading.Thread(target=self._rollout, name="rollout"),
                   threading.Thread(target=self._trainer, name="trainer")]
        for t in threads:
            t.start()
        try:
            while not self.stop.wait(0.1):
                pass
        finally:  # normal end, an error in either thread, or KeyboardInterrupt here: stop both, wait for both
            self.stop.set()
            for t in threads:
                t.join()
            for g in list(self.buffer._groups) + list(self.pool.open.values()):
                free_group(self.store, g)  # not trained (the ledger's leftover): nothing is left in the store
            if self.weights_root is not None and not self.cfg.weights_dir:
                shutil.rmtree(self.weights_root, ignore_errors=True)
        if self.errors:
            raise RuntimeError("the loop failed:\n" + "\n".join(self.errors))
        return self.history

    def ledger(self) -> dict:
        """Where every episode went: started = finished + faults + cut (by the stop) + running; every finished one is
        trained, rejected, dropped, abandoned or left over (waiting in the buffer or in an unfinished group)."""
        s = self.stats
        leftover = s.finished - s.trained - s.rejected - s.dropped_stale - s.abandoned
        return dict(started=s.started, finished=s.finished, faults=s.faults, cut=s.cut, running=self.pool.in_flight,
                    trained=s.trained, rejected=s.rejected, dropped_stale=s.dropped_stale, abandoned=s.abandoned,
                    leftover=leftover, faults_by_end=dict(s.faults_by_end),
                    in_buffer=sum(len(g.trajectories) for g in list(self.buffer._groups)),
                    in_open_groups=sum(len(g.trajectories) for g in self.pool.open.values()))


def main(argv=None):
    from experiments.loop_demo import main as demo  # the demo drives the whole loop: it lives with the scripts

    demo(argv)


if __name__ == "__main__":
    main()
