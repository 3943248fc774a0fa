"""The real 04 scheduler at the paper's scale, on simulated time: where the speedup over sync comes from.

04's Loop runs unchanged (its pool, admission, staleness bound, group buffer, trainer thread, weight refresh and its
check); only what it drives is a stand-in: environments, an engine and a trainer that sleep for durations drawn from
a stated profile (`Profile`, the paper's setting by default, every number with its source) and divide them by
`--scale`, so that an 11-minute update takes about a second. Throughput is then measured in simulated time (wall
time x scale). Nothing here is a GPU or a browser: the numbers say what the *scheduler* does with the paper's
workload, not what the paper's cluster does.

Variants (the same profile, the same seed): sync (rollout one batch with the current weights -> train -> refresh),
async with staleness 0 (overlap and the everlasting pool, but only one batch in flight, as sync), async with a drained
pool (no episode spans a refresh), async with screenshots by value (groups carry the pixels and
cross to the trainer serialised, at `shot_mb / transport_gbps`), full async; plus rollout alone (no training time)
for the overlap efficiency. Then two sweeps: the spread of episode lengths and the ratio of train time to rollout
time, each drawn as async/sync.

    python -m experiments.paper_scale                  # the study, ~25 min on 2 cores: figures/paper_scale.{json,png}
    python -m experiments.paper_scale --quick          # 4 variants only, fewer updates
    python -m experiments.paper_scale --scale 100      # slower and finer: results must not depend on the scale

Left out: engine memory, prefix caching and KV pressure (a reply's time grows linearly with the requests in flight on
its engine, `load_slowdown`); the warm-up of a synchronous pool recreating its browsers (every episode pays `reset_s`
in every variant); the object store spilling to disk (the paper's reason for lightweight screenshots: by value here
costs only the copy). Each is a reason the paper's 2.9x may differ from what comes out.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch

from asyncwebrl import ROOT, load, weights

env = load("01_env")
pol = load("02_policy")
loop_mod = load("04_async_loop")


@dataclass
class Profile:
    """The paper's workload, in simulated seconds. [C] the released config (paper-digest.md section 6), [P] the
    paper, [N] the config's engineering comments (digest 4.2), [A] assumed here, with the reason."""
    group_size: int = 8  # G [C]
    batch_groups: int = 16  # groups per update: 128 trajectories [C]
    max_staleness: int = 2  # max_head_offpolicyness [C]
    max_concurrent: int = 1280  # max_concurrent_rollouts [C]; admission caps running at (staleness+1) x 128 = 384
    horizons: tuple = (10, 20, 30)  # training horizons Easy/Medium/Hard [C]; tasks spread evenly over them [A]
    tasks: int = 300  # distinct tasks [A]: enough that a task rarely repeats within a staleness window
    steps_success: float = 5.1  # mean steps of a success [P]
    steps_failure: float = 12.5  # mean steps of a failure [P]
    length_sigma: float = 0.5  # log-normal spread of lengths within each class [A]
    length_spread: float = 1.0  # swept: 1 = the lengths above; 0 = every episode the same mean length; between,
    # both class means move towards the overall mean and length_sigma shrinks in proportion
    success_beta: tuple = (0.6, 1.0)  # per-task success probability ~ Beta(a, b) [A]: mean 0.38, between the
    # paper's 26% base and 45% final; U-shaped, so that some groups are all-fail or all-success (dynamic sampling)
    engines: int = 48  # rollout GPUs, one engine each [C]
    reply_s: float = 25.0  # one reply, median, on an idle engine [A]: chosen so that the profile's first batch
    # (~17 min [N]) and steady update (~11 min [N]) come out near the config's notes; printed beside them
    reply_sigma: float = 0.6  # log-normal spread of reply times (long replies, long prompts) [A]
    load_slowdown: float = 0.05  # per extra request in flight on the same engine [A] (batched decode is memory-bound)
    browser_s: float = 4.0  # execute an action, let the page settle, take the screenshot [A]
    reset_s: float = 10.0  # open a task's start page in a fresh session [A]
    judge_s: float = 15.0  # the LLM judge at the episode's end (one gemini-2.5-flash call) [A]
    train_s: float = 96.0  # one update of 128 trajectories of average length ~1.6 min [N]; in proportion to the
    # steps trained (a batch of long trajectories trains longer); swept
    refresh_s: float = 10.0  # pause rollout, broadcast 16 GB of bf16 weights, resume [A]
    shot_mb: float = 2.76  # one 1280x720 RGB screenshot as pixels (the pixel store's unit) [A]
    transport_gbps: float = 1.0  # by value: serialise + copy + deserialise through the object store [A]

    @property
    def batch(self) -> int:
        return self.group_size * self.batch_groups


# ----------------------------------------------------------------------------------------------------------------
# Stand-ins with the interfaces 04 drives (those of 01's BrowserEnvs, 02's engines and 04's Learner)


class Clock:
    def __init__(self, scale: float):
        self.scale = scale

    async def sleep(self, sim_s: float) -> None:
        await asyncio.sleep(sim_s / self.scale)

    def block(self, sim_s: float) -> None:
        time.sleep(sim_s / self.scale)


def length(mean: float, sigma: float, z: float, u: float, horizon: int) -> int:
    """A log-normal length (normal draw z), rounded at random (uniform draw u) so that its mean is exact."""
    return max(1, min(horizon, math.floor(mean * math.exp(sigma * z - sigma ** 2 / 2) + u)))


def stretch(p: Profile, target: float, sigma: float) -> float:
    """The mean to draw lengths with so that, cut at each task's horizon, they average `target` (the paper's 5.1 and
    12.5 are what episodes measured, after the cut)."""
    rng = random.Random(0)
    draws = [(rng.gauss(0, 1), rng.random(), p.horizons[i % len(p.horizons)]) for i in range(3000)]
    lo, hi = 0.5 * target, 4.0 * target
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if statistics.fmean(length(mid, sigma, *d) for d in draws) < target else \
            (lo, mid)
    return (lo + hi) / 2


class SimEnvs:
    """One episode: reset, then a length drawn for its task's success or failure; the judge at the end."""

    def __init__(self, p: Profile, clock: Clock, store, seed: int):
        self.p, self.clock, self.store = p, clock, store
        rng = random.Random(seed)
        self.success_p = [rng.betavariate(*p.success_beta) for _ in range(p.tasks)]
        a, b = p.success_beta
        overall = (a * p.steps_success + b * p.steps_failure) / (a + b)  # mean success rate a / (a + b)
        self.sigma = p.length_sigma * p.length_spread
        self.mean = {r: stretch(p, overall + p.length_spread * (m - overall), self.sigma)
                     for r, m in ((1.0, p.steps_success), (0.0, p.steps_failure))}
        self.lengths: list[tuple[float, int]] = []  # (reward, steps) of every episode ended

    async def start(self):
        pass

    async def close(self):
        pass

    def slot(self, i):
        return SimEnv(self)


class SimEnv:
    def __init__(self, owner: SimEnvs):
        self.o = owner

    def _obs(self):
        key = self.o.store.put(self.episode, f"{self.episode}/{self.t}".encode())  # a key, as in 01
        return env.Observation(goal="simulated", url="sim://", screenshot=key, step=self.t)

    async def reset(self, task, seed, episode):
        p, rng = self.o.p, random.Random(f"{episode}")
        self.task, self.episode, self.t = task, episode, 0
        index = int(task.id.rsplit("/", 1)[1])
        self.reward = float(rng.random() < self.o.success_p[index])
        self.steps = length(self.o.mean[self.reward], self.o.sigma, rng.gauss(0, 1), rng.random(),
                            task.max_steps)
        await self.o.clock.sleep(p.reset_s)
        return self._obs()

    async def step(self, action):
        p = self.o.p
        self.t += 1
        done = self.t >= self.steps
        await self.o.clock.sleep(p.browser_s + (p.judge_s if done else 0.0))
        if done:
            self.o.lengths.append((self.reward, self.t))
            return env.StepResult(self._obs(), self.reward, True, {"end": "max_steps" if not self.reward else
                                                                   "task_done"})
        return env.StepResult(self._obs(), 0.0, False, {})

    async def close(self):
        pass


class SimEngine:
    """48 engines that batch continuously (one request per episode step, as 04 gives vLLM): a reply takes a drawn
    time, longer when its engine is busier; a weight refresh pauses new requests for refresh_s."""

    def __init__(self, p: Profile, clock: Clock, seed: int):
        self.p, self.clock, self.rng, self.version = p, clock, random.Random(seed), 0
        self.in_flight, self.refreshing = 0, threading.Event()

    def turn(self, obs, state):
        return pol.Turn(prompt=obs.goal, images=(obs.screenshot,), n_marks=0)

    async def asample(self, turn, store):
        while self.refreshing.is_set():  # rollout.pause(): requests wait while the weights are replaced
            await self.clock.sleep(0.5)
        version, p = self.version, self.p
        self.in_flight += 1
        busy = max(0.0, self.in_flight / p.engines - 1)
        reply = p.reply_s * math.exp(p.reply_sigma * self.rng.gauss(0, 1)) * (1 + p.load_slowdown * busy)
        await self.clock.sleep(reply)
        self.in_flight -= 1
        return pol.Sample("Memory: m\nAction: click(#0)", [1, 2, 3], [-0.5] * 3, version, False)

    def load_weights(self, folder, version):
        self.refreshing.set()
        self.clock.block(self.p.refresh_s)
        self.version = version
        self.refreshing.clear()
        return [weights.digest_of(folder)]


class SimLearner:
    """Trains for train_s x (steps in the batch / steps of an average batch); publishes a one-tensor weight file."""

    def __init__(self, p: Profile, clock: Clock):
        self.p, self.clock, self.updates = p, clock, 0
        self.mean_steps = (p.steps_success + p.steps_failure) / 2  # dynamic sampling keeps mixed groups: ~half each

    def update(self, groups):
        steps = sum(len(t.steps) for g in groups for t in g.trajectories)
        self.clock.block(self.p.train_s * steps / (self.p.batch * self.mean_steps))
        self.updates += 1
        return {}

    def publish(self, folder, dtype=None):
        return weights.write([("version", torch.tensor([float(self.updates)]))], folder, dtype)


class SimStore(env.ScreenshotStore):
    """01's store; by value, every screenshot fetched for a group crosses the object store at transport_gbps."""

    def __init__(self, p: Profile, clock: Clock):
        super().__init__()
        self.p, self.clock = p, clock

    def get(self, key):
        self.clock.block(self.p.shot_mb / 1000 / self.p.transport_gbps)
        return super().get(key)


# ----------------------------------------------------------------------------------------------------------------
# One run, the variants, the sweeps

VARIANTS = [("sync", dict(mode="sync")), ("async, staleness 0", dict(mode="async", max_staleness=0)),
            ("async, drained pool", dict(mode="async", drain=True)),
            ("async, screenshots by value", dict(mode="async", screenshots_by_value=True)),
            ("async (full)", dict(mode="async"))]


def run(p: Profile, scale: float, updates: int, warm: int = 2, seed: int = 0, **loop_overrides) -> dict:
    """One run of 04's Loop on the stand-ins. Steady state: trained trajectories per simulated second from the end
    of update `warm` to the end of the last (the first batches of an empty pool are a start-up transient)."""
    clock = Clock(scale)
    store = SimStore(p, clock)
    envs, engine, learner = SimEnvs(p, clock, store, seed), SimEngine(p, clock, seed), SimLearner(p, clock)
    tasks = [env.Task(id=f"sim/{i}", url="", goal="", judge="sim", difficulty="", split="train", family="sim",
                      max_steps=p.horizons[i % len(p.horizons)]) for i in range(p.tasks)]
    cfg = loop_mod.LoopConfig(**{**dict(workers=min(p.max_concurrent, (p.max_staleness + 1) * p.batch),
                                        group_size=p.group_size, batch_groups=p.batch_groups,
                                        max_staleness=p.max_staleness, updates=updates, seed=seed),
                                 **loop_overrides})
    loop = loop_mod.Loop(cfg, envs, engine, learner, tasks, store)
    t0 = time.perf_counter()
    h = loop.run()
    trained = [m["trajectories"] for m in h]
    sim = [m["time_s"] * scale for m in h]
    steady = sum(trained[warm:]) / (sim[-1] - sim[warm - 1])
    succ = [n for r, n in envs.lengths if r]
    fail = [n for r, n in envs.lengths if not r]
    lengths = [n for _, n in envs.lengths]
    busy = [s for s in loop.timeline.spans if s[0] == "trainer" and s[1] == "train"]
    return dict(trajectories_per_s=round(steady, 5), first_update_min=round(sim[0] / 60, 2),
                update_min=round((sim[-1] - sim[warm - 1]) / (len(h) - warm) / 60, 2),
                trainer_busy=round(sum(b - a for _, _, a, b, _ in busy) * scale / sim[-1], 3),
                staleness_max=max(m["staleness_max"] for m in h), wall_s=round(time.perf_counter() - t0, 1),
                steps_success=round(statistics.fmean(succ), 2) if succ else None,
                steps_failure=round(statistics.fmean(fail), 2) if fail else None,
                length_cv=round(statistics.pstdev(lengths) / statistics.fmean(lengths), 3),
                rejected_groups=loop.stats.groups_rejected, trained_groups=loop.stats.groups_trained)


def study(p: Profile, scale: float, updates: int, quick: bool) -> dict:
    out = dict(label="SIMULATED: 04's real scheduler with stand-in envs, engine and trainer (experiments/"
               "paper_scale.py); not a measurement of GPUs", profile=dataclasses.asdict(p), scale=scale,
               updates=updates, variants={})
    for name, overrides in VARIANTS:
        out["variants"][name] = r = run(p, scale, updates, **overrides)
        print(f"  {name:30s} {r['trajectories_per_s']:.4f} traj/s, {r['update_min']:.1f} min/update "
              f"(first {r['first_update_min']:.1f}), trainer busy {r['trainer_busy']:.2f}, wall {r['wall_s']}s",
              flush=True)
    v = out["variants"]
    sync = v["sync"]["trajectories_per_s"]
    for r in v.values():
        r["vs_sync"] = round(r["trajectories_per_s"] / sync, 3)
    rollout = run(dataclasses.replace(p, train_s=0.0), scale, updates)["trajectories_per_s"]
    train = p.batch / p.train_s  # the trainer alone, at the reference batch
    out["rollout_only_trajectories_per_s"], out["train_only_trajectories_per_s"] = rollout, round(train, 5)
    out["overlap_efficiency"] = round(v["async (full)"]["trajectories_per_s"] / min(rollout, train), 3)
    out["rollout_over_train"] = round(train / rollout, 3)  # > 1: rollout is the slower stage
    print(f"  rollout alone {rollout:.4f} traj/s, training alone {train:.4f} traj/s; overlap efficiency "
          f"{out['overlap_efficiency']}", flush=True)
    if quick:
        return out
    # dynamic sampling makes sync roll a new wave for every rejected group; without it, what is left of the gap
    s, a = run(p, scale, updates, mode="sync", dynamic_sampling=False), run(p, scale, updates, dynamic_sampling=False)
    out["without_dynamic_sampling"] = dict(sync=s["trajectories_per_s"], async_=a["trajectories_per_s"],
                                           ratio=round(a["trajectories_per_s"] / s["trajectories_per_s"], 3))
    print(f"  without dynamic sampling: async/sync {out['without_dynamic_sampling']['ratio']}", flush=True)
    out["sweep_spread"], out["sweep_train"] = [], []
    for spread in (0.0, 0.5, 1.0, 1.5):
        q = dataclasses.replace(p, length_spread=spread)
        s, a = run(q, scale, updates, mode="sync"), run(q, scale, updates, mode="async")
        out["sweep_spread"].append(dict(length_spread=spread, length_cv=a["length_cv"], sync=s["trajectories_per_s"],
                                        async_=a["trajectories_per_s"],
                                        ratio=round(a["trajectories_per_s"] / s["trajectories_per_s"], 3)))
        print(f"  spread x{spread}: cv {a['length_cv']}, async/sync {out['sweep_spread'][-1]['ratio']}", flush=True)
    for f in (0.25, 1.0, 4.0, 16.0):
        q = dataclasses.replace(p, train_s=p.train_s * f)
        s, a = run(q, scale, updates, mode="sync"), run(q, scale, updates, mode="async")
        out["sweep_train"].append(dict(train_s=q.train_s, train_over_rollout=round(rollout / (p.batch / q.train_s), 3),
                                       sync=s["trajectories_per_s"], async_=a["trajectories_per_s"],
                                       ratio=round(a["trajectories_per_s"] / s["trajectories_per_s"], 3)))
        print(f"  train x{f}: train/rollout time {out['sweep_train'][-1]['train_over_rollout']}, async/sync "
              f"{out['sweep_train'][-1]['ratio']}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="04's scheduler at the paper's scale on simulated time (stand-in envs, "
                                 "engine, trainer); writes figures/paper_scale.json and .png")
    ap.add_argument("--scale", type=float, default=250.0, help="simulated seconds per wall second (default 250; "
                    "above ~400 the pool's event loop falls behind on 2 cores and async reads ~5%% low)")
    ap.add_argument("--updates", type=int, default=8, help="updates per run; the first 2 are not timed (default 8)")
    ap.add_argument("--quick", action="store_true", help="the four variants and rollout alone only, no sweeps")
    ap.add_argument("--out", default=str(ROOT / "figures"), help="folder for paper_scale.json/.png")
    args = ap.parse_args(argv)
    if not 1 <= args.scale <= 5000 or args.updates < 4:
        ap.error("--scale must be in [1, 5000] and --updates at least 4")
    result = study(Profile(), args.scale, args.updates, args.quick)
    from pathlib import Path

    from asyncwebrl.figures import paper_scale_figure

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_scale.json").write_text(json.dumps(result, indent=1) + "\n")
    paper_scale_figure(result, out / "paper_scale.png")
    print(f"wrote {out / 'paper_scale.json'} and {out / 'paper_scale.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
