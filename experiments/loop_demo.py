"""The 04 demo (`python 04_async_loop.py`, or `python -m experiments.loop_demo`): a short async run and a short sync
run of the loop with the real browser env and the tiny model, each printing its throughput, utilisation and ledger
as JSON and writing its timeline. Dynamic sampling is off: the demo is about the loop, not learning.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from asyncwebrl import load, suites

env, policy_mod, loop_mod = load("01_env"), load("02_policy"), load("04_async_loop")


def real_run(mode: str, updates: int, tasks: list[str], out: Path, max_steps: int | None = None, **loop_cfg) -> dict:
    """A short run; writes out/timeline_<mode>.jsonl and returns a summary (throughput, utilisation, ledger)."""
    store, pcfg = env.ScreenshotStore(), policy_mod.PolicyConfig()
    tasks = [dataclasses.replace(t, max_steps=max_steps or t.max_steps) for t in suites.miniwob_tasks(names=tasks)]
    policy, sampler = policy_mod.Policy(pcfg), policy_mod.HFSampler(pcfg)  # same files: same initial weights
    say = lambda m, groups: print(f"[{mode}] update {m['version']}: success {m['success']:.2f}, {m['samples']} "  # noqa: E731
                                  f"samples in {m['update_s']:.1f}s, staleness max {m['staleness_max']}", flush=True)
    loop = loop_mod.Loop(loop_mod.LoopConfig(mode=mode, updates=updates, **loop_cfg), env.BrowserEnvs(store),
                         sampler, loop_mod.Learner(policy, store), tasks, store, on_update=say)
    t0 = time.perf_counter()
    loop.run()
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    loop.timeline.dump(out / f"timeline_{mode}.jsonl")
    samples = sum(m["samples"] for m in loop.history)
    return dict(mode=mode, wall_s=round(wall, 2), updates=len(loop.history), samples=samples,
                samples_per_s=round(samples / wall, 3), utilisation=loop.timeline.utilisation(wall),
                ledger=loop.ledger())


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="04_async_loop.py", description="04_async_loop: a short async run and a "
                                     "short sync run with the real browser env and the tiny model; writes their "
                                     "timelines.")
    parser.add_argument("--updates", type=int, default=3, help="updates per run (default: 3)")
    parser.add_argument("--tasks", nargs="+", default=["click-button", "click-link", "click-dialog"],
                        metavar="NAME", help="MiniWoB++ tasks (default: click-button click-link click-dialog)")
    parser.add_argument("--modes", nargs="+", default=["async", "sync"], choices=["async", "sync"],
                        help="which pipelines to run (default: both)")
    parser.add_argument("--out", type=Path, default=Path("runs/04_demo"), help="default: runs/04_demo")
    args = parser.parse_args(argv)
    try:
        suites.miniwob_tasks(names=args.tasks)
    except ValueError as e:
        parser.error(str(e))
    policy_mod.quiet_libraries()
    for mode in args.modes:
        print(json.dumps(real_run(mode, args.updates, args.tasks, args.out, dynamic_sampling=False)))


if __name__ == "__main__":
    main()
