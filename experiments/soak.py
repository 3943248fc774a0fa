"""Fault soak (`python -m experiments.soak`): the real 04 loop, with real chromium and the tiny model, runs N
episodes (default 1000) while faults are injected at random, then checks that nothing was lost or mislabelled.

Injected, each at random and independently (SoakConfig has the rates):
  renderer crash     the page is sent to chrome://crash before a step        -> end page_crashed (a fault)
  hung page          a script that never returns, started before a step      -> end timeout (a fault)
  browser killed     SIGKILL to the chromium process: every open page dies   -> end browser_died (a fault)
  env exception      the env's step raises                                   -> the slot runs again (a fault)
  judge fails        on answer tasks (judged by a model): the judge raises or babbles instead of YES/NO
                                                                              -> end judge_error (a fault)
  malformed reply    the sampler's text is replaced with hostile text        -> the agent's invalid action (trained)
At the end it checks: every started episode accounted for exactly once (finished, a fault, cut by the stop), every
finished one exactly once (trained, rejected, abandoned, left over), no trained trajectory ended by a fault and no
trained trajectory from an episode a fault was injected into, no loop crash, the screenshot store empty, no
chromium process left behind, and memory (Python and chromium) from the first hundred episodes to the last.
Writes figures/soak.json. A short version runs in the tests (tests/test_soak.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from asyncwebrl import ROOT, load, suites
from asyncwebrl.browser import EnvConfig
from asyncwebrl.judge import JUDGES

env, policy_mod, loop_mod = load("01_env"), load("02_policy"), load("04_async_loop")

TASKS = ["click-button", "click-link", "click-dialog", "click-tab", "focus-text"]
JUDGED = ["click-button", "click-link"]  # also run as answer tasks judged by the (faulty) soak judge
HOSTILE = ["", "\x00\x00\x00", "Action: click(#99999999999999999999)", "Memory: " + "x" * 5000,
           'Action: type("\\ud800")', "Memory: a\nAction: click(#0)\nAction: click(#1)", "Action: eval(open('x'))",
           "Action: " + "(" * 2000, "\ufeffMemory: \u202e\nAction: press(\"F13\")"]


@dataclass
class SoakConfig:
    episodes: int = 1000  # stop the loop once this many episodes have started
    p_crash: float = 0.02  # per step: crash the page's renderer
    p_hang: float = 0.02  # per step: start a script that never returns
    p_kill: float = 0.003  # per step: SIGKILL the chromium process (every slot's page dies)
    p_raise: float = 0.02  # per step: the env raises
    p_answer: float = 0.3  # per step of an answer task: the agent answers (and the judge is asked)
    p_judge_fault: float = 0.3  # per judge call: it raises (unreachable) or babbles (neither YES nor NO)
    p_malformed: float = 0.05  # per reply: hostile text instead of the model's
    max_steps: int = 4  # horizon: short episodes, many of them
    step_timeout_s: float = 5.0  # a hung page ends its episode after this (a reset may take twice as long)
    workers: int = 8
    seed: int = 0


def chromium_pids() -> dict[int, str]:
    """Live chromium processes on this machine: pid -> command line."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "comm").read_text().strip() == "chromium":  # its renderers too
                if stat(int(d.name))[0] != "Z":  # a zombie is gone already
                    out[int(d.name)] = (d / "cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
    return out


def stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ... (raises OSError when the process is gone)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()


def started_at(pid: int) -> str:
    """The process's start time (clock ticks since boot): with the pid, it names one process, even after pid reuse."""
    try:
        return stat(pid)[19]
    except (OSError, IndexError):
        return ""


def pss_mb(pids) -> float:
    """Proportional set size, MB: memory shared between processes (chromium's renderers share much) counts once."""
    total = 0
    for pid in pids:
        try:
            total += int(next(x for x in open(f"/proc/{pid}/smaps_rollup") if x.startswith("Pss:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def trimmed() -> float:
    """This process's PSS after glibc's malloc_trim(0) hands the heap it holds but does not use back to the system:
    what is left is what is really in use (torch and numpy free CPU buffers of many sizes from many threads, and
    glibc keeps much of it)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return pss_mb([os.getpid()])


class FaultyEnv:
    """A BrowserEnv slot that injects page faults before a step; records every injection by episode."""

    def __init__(self, inner, soak: "Soak"):
        self.inner, self.soak = inner, soak

    async def reset(self, task, seed, episode):
        self.task, self.episode = task, episode
        return await self.inner.reset(task, seed, episode=episode)

    async def step(self, action):
        s, c, page = self.soak, self.soak.cfg, self.inner._page
        r = s.rng.random()
        if r < c.p_raise:
            s.injected(self.episode, "env_raised")
            raise RuntimeError("injected: the env raised")
        if (r := r - c.p_raise) < c.p_crash and page is not None:
            s.injected(self.episode, "crash")
            await _quietly(page.goto("chrome://crash", timeout=2000))
        elif (r := r - c.p_crash) < c.p_hang and page is not None:
            s.injected(self.episode, "hang")
            await _quietly(page.evaluate("setTimeout(() => { while (true) {} }, 0)"))
        elif r - c.p_hang < c.p_kill:
            s.kill_browser(self.episode)
        if self.task.judge == "soak" and s.rng.random() < c.p_answer:
            action = 'answer("soak")'  # the judge is asked (and may fail)
        return await self.inner.step(action)

    async def close(self):
        await self.inner.close()


async def _quietly(awaitable):
    try:
        await awaitable
    except Exception:  # the page died under the injection: that is the point
        pass


class FaultyEnvs(env.BrowserEnvs):
    def __init__(self, store, config, soak: "Soak"):
        super().__init__(store, config)
        self.soak = soak

    def slot(self, i: int):
        return FaultyEnv(super().slot(i), self.soak)


class FaultySampler:
    """The tiny model's sampler, whose text is sometimes replaced with hostile text (the tokens stay as sampled)."""

    def __init__(self, inner, soak: "Soak"):
        self.inner, self.soak = inner, soak

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def sample(self, turns, store, greedy: bool = False):
        out = self.inner.sample(turns, store, greedy)
        for i, s in enumerate(out):
            if self.soak.rng.random() < self.soak.cfg.p_malformed:
                self.soak.count("malformed_reply")
                out[i] = dataclasses.replace(s, text=self.soak.rng.choice(HOSTILE))
        return out


class Soak:
    def __init__(self, cfg: SoakConfig):
        self.cfg, self.rng = cfg, random.Random(cfg.seed)
        self.lock = threading.Lock()  # the judge runs in worker threads
        self.injections: dict[str, int] = {}
        self.faulted_episodes: set[str] = set()  # episodes an infrastructure fault was injected into

    def count(self, kind: str) -> None:
        with self.lock:
            self.injections[kind] = self.injections.get(kind, 0) + 1

    def injected(self, episode: str, kind: str) -> None:
        self.count(kind)
        self.faulted_episodes.add(episode)

    def kill_browser(self, episode: str) -> None:
        browsers = [p for p, cmd in chromium_pids().items() if "--type=" not in cmd and p in self.ours()]
        for pid in browsers:
            os.kill(pid, signal.SIGKILL)
        if browsers:  # every open page dies: each running episode ends browser_died (a fault) or raises
            self.count("browser_killed")
            self.faulted_episodes.add(episode)

    def ours(self) -> set[int]:
        """This process's descendants (Playwright's driver, then chromium and its renderers)."""
        children: dict[int, list[int]] = {}
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit():
                    ppid = int(stat(int(d.name))[1])
                    children.setdefault(ppid, []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
        seen, todo = set(), [os.getpid()]
        while todo:
            for c in children.get(todo.pop(), []):
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        return seen

    def judge(self, task, answer: str, shots: list) -> float:
        with self.lock:
            r, coin = self.rng.random(), self.rng.random()
        if r < self.cfg.p_judge_fault / 2:
            self.count("judge_unreachable")
            raise ConnectionError("injected: the judge is unreachable")
        if r < self.cfg.p_judge_fault:
            self.count("judge_babbles")
            return "Well, it depends."  # neither YES nor NO: 01 cannot read a reward from it
        return float(coin < 0.5)


def run(cfg: SoakConfig) -> dict:
    soak, store = Soak(cfg), env.ScreenshotStore()
    JUDGES["soak"] = soak.judge
    tasks = [dataclasses.replace(t, max_steps=cfg.max_steps) for t in suites.miniwob_tasks(names=TASKS)]
    tasks += [dataclasses.replace(t, id=f"soak-judge/{t.id.split('/')[-1]}", judge="soak")
              for t in tasks if t.id.split("/")[-1] in JUDGED]
    pcfg = policy_mod.PolicyConfig()
    sampler = FaultySampler(policy_mod.HFSampler(pcfg), soak)
    learner = loop_mod.Learner(policy_mod.Policy(pcfg), store)
    envs = FaultyEnvs(store, EnvConfig(step_timeout_s=cfg.step_timeout_s), soak)
    loop_cfg = loop_mod.LoopConfig(workers=cfg.workers, group_size=4, batch_groups=2, updates=10**6, seed=cfg.seed)
    loop = loop_mod.Loop(loop_cfg, envs, sampler, learner, tasks, store)
    launched: set[tuple[int, str]] = set()  # (pid, start time) of every chromium process this run started

    def note_ours() -> None:  # chromium under this process, seen every 0.2 s: its renderers live for seconds
        mine = soak.ours()
        launched.update((p, started_at(p)) for p in chromium_pids() if p in mine)
    memory, t0 = [], time.perf_counter()

    def watch():  # memory at every hundred episodes started; the stop once N have started
        mark = 0
        while not loop.stop.wait(0.2):
            note_ours()
            started = loop.stats.started
            if started >= mark:
                mine, python_mb = soak.ours(), pss_mb([os.getpid()])
                memory.append(dict(started=started, python_mb=round(python_mb, 1),
                                   python_trimmed_mb=round(trimmed(), 1),
                                   chromium_mb=round(pss_mb([p for p in chromium_pids() if p in mine]), 1)))
                print(f"[soak] {started} episodes started, {loop.stats.faults} faults, {loop.version} updates, "
                      f"python {memory[-1]['python_mb']:.0f} MB, chromium {memory[-1]['chromium_mb']:.0f} MB",
                      flush=True)
                mark += 100
            if started >= cfg.episodes:
                loop.stop.set()

    watcher = threading.Thread(target=watch, name="soak-watch")
    watcher.start()
    error = None
    try:
        loop.run()
    except RuntimeError as e:
        error = str(e)
    loop.stop.set()
    watcher.join()
    for _ in range(50):  # the killed and closed chromium processes take a moment to exit (longer on a busy machine)
        alive = chromium_pids()  # (other programs' chromium, a concurrent soak's say, are not ours to count)
        left = {p: alive[p] for p, t in launched if p in alive and started_at(p) == t}
        if not left:
            break
        time.sleep(0.2)
    ledger = loop.ledger()
    by_id = {t.id: t for t in loop.pool.trajectory_log}
    trained = [by_id[i] for i in loop.trained_ids]
    checks = dict(
        no_loop_crash=error is None,
        trained=loop.version > 0 and ledger["trained"] > 0,
        every_started_episode_once=ledger["started"] == ledger["finished"] + ledger["faults"] + ledger["cut"]
        + ledger["running"],
        every_finished_episode_once=ledger["finished"] == ledger["trained"] + ledger["rejected"]
        + ledger["dropped_stale"] + ledger["abandoned"] + ledger["leftover"]
        and ledger["leftover"] == ledger["in_buffer"] + ledger["in_open_groups"],
        no_fault_trained=all(t.end in env.AGENT_ENDS for t in trained),
        no_injected_episode_trained=not soak.faulted_episodes & {t.episode for t in trained},
        screenshot_store_empty=len(store) == 0,
        no_chromium_left=bool(launched) and not left,  # (none seen would make this check say nothing)
    )
    first, last = memory[min(1, len(memory) - 1)], memory[-1]  # the first hundred: after start-up (model, browser)
    result = dict(config=dataclasses.asdict(cfg), wall_s=round(time.perf_counter() - t0, 1), updates=loop.version,
                  ledger=ledger, injected=soak.injections, faults_by_end=ledger["faults_by_end"], checks=checks,
                  passed=all(checks.values()), memory=memory,
                  memory_growth=dict(python_mb=round(last["python_mb"] - first["python_mb"], 1),
                                     python_trimmed_mb=round(last["python_trimmed_mb"] - first["python_trimmed_mb"], 1),
                                     chromium_mb=round(last["chromium_mb"] - first["chromium_mb"], 1),
                                     from_started=first["started"], to_started=last["started"]),
                  chromium_seen=len(launched), chromium_left=list(left.values())[:5], error=error)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=SoakConfig.episodes, help="episodes to start (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seeds the faults and the tasks (default: 0)")
    p.add_argument("--out", type=Path, default=ROOT / "figures" / "soak.json", help="default: figures/soak.json")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes must be at least 1")
    policy_mod.quiet_libraries()
    result = run(SoakConfig(episodes=args.episodes, seed=args.seed))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "updates", "injected", "faults_by_end", "checks",
                                             "memory_growth")}, indent=1))
    print(f"{'passed' if result['passed'] else 'FAILED'}; written to {args.out}")
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["passed"] else 1)
