"""Throughput benchmark: sync against async, with the paper's two system
adaptations ablated, rollout alone and training alone, measured one after the other on this machine.

Every variant starts from the same weights, the same tasks and the same seed, and runs the same number of updates
(B x G trajectories each). Dynamic sampling is off here: with it, how many groups are rejected (all rewards equal)
depends on the policy's luck, and trained samples/s swung 2x between repeats of one variant; without it every
finished group is trained, so the benchmark times the pipeline, not the rejection lottery. Each repeat runs every
variant once; ratios (vs sync, overlap efficiency) are taken within a repeat and their median is reported.
Writes figures/throughput.json and figures/throughput.png.

    python -m experiments.compare_sync [--repeats N] [any 05_train.py flag, e.g. --updates 6]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import statistics
import time
from pathlib import Path

import torch

from asyncwebrl import ROOT, load, weights
from asyncwebrl.figures import throughput_figure
from asyncwebrl.rundir import git_commit

env = load("01_env")
loop_mod = load("04_async_loop")
train = load("05_train")
build, load_tasks, placement, policy_config = train.build, train.load_tasks, train.placement, train.policy_config
TrainConfig = train.TrainConfig


VARIANTS = [("sync", dict(mode="sync")), ("async, drained pool", dict(mode="async", drain=True)),
            ("async, screenshots by value", dict(mode="async", screenshots_by_value=True)),
            ("async (full)", dict(mode="async"))]


class _NoTraining:
    """Rollout-only stage: a learner that takes no time (the refresh still reloads the same weights)."""

    def __init__(self, policy):
        self.policy = policy

    def update(self, groups):
        return {}

    def publish(self, folder, dtype=None):
        return weights.write(self.policy.model.state_dict().items(), folder, dtype)


def _cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (the engine process, chromium)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed_run(cfg, pcfg, tasks, name, keep_batch=False, no_training=False, **overrides) -> dict:
    store = env.ScreenshotStore()
    torch.manual_seed(cfg.seed)
    policy, sampler, learner, loop = build(cfg, pcfg, store, tasks, **overrides)
    if no_training:
        loop.learner = _NoTraining(policy)
    kept = {}

    def on_update(m, groups):
        print(f"  [{name}] update {m['version']}/{cfg.updates}: {m['samples']} samples, "
              f"{m['update_s']:.1f}s", flush=True)
        if keep_batch:  # for the train-only measurement: this batch, with its screenshots' bytes
            kept["groups"] = [loop_mod.by_value(g, store) for g in groups]

    loop.on_update = on_update
    t0, cpu0 = time.perf_counter(), _cpu_s()
    loop.run()
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    samples = sum(m["samples"] for m in loop.history)
    # steady state: from the end of the first update to the end of the last, so that start-up (chromium, first
    # pages, first model calls) does not decide the comparison; end-to-end numbers are kept beside it
    h = loop.history
    steady = sum(m["samples"] for m in h[1:]) / (h[-1]["time_s"] - h[0]["time_s"]) if len(h) > 1 else float("nan")
    spans = [dict(component=c, kind=k, start=round(a, 3), end=round(b, 3)) for c, k, a, b, _ in loop.timeline.spans]
    return dict(name=name, wall_s=round(wall, 2), updates=len(loop.history), samples=samples,
                trajectories=loop.stats.trained, samples_per_s=round(steady, 4),
                end_to_end_samples_per_s=round(samples / wall, 4),
                trajectories_per_s=round(loop.stats.trained / wall, 4),
                utilisation=loop.timeline.utilisation(wall), dropped_stale=loop.stats.dropped_stale,
                cpu_s_per_sample=round(cpu / samples, 4),
                spans=spans), kept.get("groups"), learner


def compare_sync(cfg: TrainConfig, out: Path = ROOT / "figures", repeats: int = 1) -> dict:
    """Each repeat runs every variant once, one after the other (side by side in time, so they share the
    machine's state). Per variant: the median run's samples/s and, against sync, the median of the ratios taken
    within each repeat (paired: a slow repeat slows both sides)."""
    if cfg.dynamic_sampling:
        print("compare-sync: dynamic sampling off (trained samples/s would measure how many groups were rejected)")
        cfg = dataclasses.replace(cfg, dynamic_sampling=False)
    place = placement(cfg)
    tasks, pcfg = load_tasks(cfg), policy_config(cfg, place)
    runs = {name: [] for name, _ in VARIANTS + [("rollout only", {})]}
    train_sps, train_cpu = [], []
    for rep in range(repeats):
        print(f"repeat {rep + 1}/{repeats}", flush=True)
        for name, overrides in VARIANTS:
            r, groups, lrn = _timed_run(cfg, pcfg, tasks, name, keep_batch=name == "async (full)", **overrides)
            runs[name].append(r)
            if groups is not None:
                batch, learner = groups, lrn
        runs["rollout only"].append(_timed_run(cfg, pcfg, tasks, "rollout only", no_training=True,
                                               mode="async")[0])
        times, cpu0 = [], _cpu_s()
        for _ in range(3):  # train-only: the last async batch, again, on the trained weights
            t0 = time.perf_counter()
            learner.update(batch)
            times.append(time.perf_counter() - t0)
        n = sum(len(t.steps) for g in batch for t in g.trajectories)
        train_sps.append(n / statistics.median(times))
        train_cpu.append((_cpu_s() - cpu0) / (3 * n))

    def median_run(rs):
        return sorted(rs, key=lambda r: r["samples_per_s"])[len(rs) // 2]

    def paired(xs, ys):  # per-repeat ratios x / y
        return [round(x / y, 3) for x, y in zip(xs, ys)]

    sps = {name: [r["samples_per_s"] for r in rs] for name, rs in runs.items()}
    results = [median_run(runs[name]) for name, _ in VARIANTS]
    for r in results:
        r["samples_per_s_runs"] = sps[r["name"]]
        r["vs_sync_runs"] = paired(sps[r["name"]], sps["sync"])
        r["vs_sync"] = statistics.median(r["vs_sync_runs"])
    by = {r["name"]: r for r in results}
    rollout_sps, train_sps_median = median_run(runs["rollout only"])["samples_per_s"], statistics.median(train_sps)
    # overlap efficiency = async / the slower stage alone, within each repeat (1.0: the slower stage never waits)
    overlap = paired(sps["async (full)"], [min(a, b) for a, b in zip(sps["rollout only"], train_sps)])
    summary = dict(
        machine=f"{place.describe()[0]}, {torch.get_num_threads()} torch threads", engine=cfg.engine,
        config={k: getattr(cfg, k) for k in ("updates", "workers", "group_size", "batch_groups", "max_steps",
                                               "tasks", "max_staleness", "dynamic_sampling")},
        commit=git_commit(), repeats=repeats,
        speedup_async_over_sync=by["async (full)"]["vs_sync"],
        speedup_async_over_sync_runs=by["async (full)"]["vs_sync_runs"],
        rollout_only_samples_per_s=rollout_sps, train_only_samples_per_s=round(train_sps_median, 4),
        overlap_efficiency=statistics.median(overlap), overlap_efficiency_runs=overlap,
        # the machine's ceiling when both stages are CPU-bound: every core busy with one sample's rollout + training
        cpu_s_per_sample=dict(rollout=statistics.median(r["cpu_s_per_sample"] for r in runs["rollout only"]),
                              train=round(statistics.median(train_cpu), 4)),
        cores=os.cpu_count(),
        ablation=[{k: r[k] for k in ("name", "wall_s", "samples", "trajectories", "samples_per_s",
                                     "samples_per_s_runs", "vs_sync", "vs_sync_runs", "end_to_end_samples_per_s",
                                     "trajectories_per_s", "utilisation", "dropped_stale", "cpu_s_per_sample")}
                  for r in results],
        timelines={r["name"]: r["spans"] for r in results if r["name"] in ("sync", "async (full)")})
    c = summary["cpu_s_per_sample"]
    summary["cpu_ceiling_samples_per_s"] = round(summary["cores"] / (c["rollout"] + c["train"]), 4)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(summary, indent=1) + "\n")
    throughput_figure(summary, out / "throughput.png")
    print(f"\n{'variant':30s} {'samples/s':>10s} {'end-to-end':>11s} {'traj/s':>8s} {'vs sync':>8s}  utilisation")
    for r in summary["ablation"]:
        print(f"{r['name']:30s} {r['samples_per_s']:10.3f} {r['end_to_end_samples_per_s']:11.3f} "
              f"{r['trajectories_per_s']:8.3f} {r['vs_sync']:7.2f}x  {r['utilisation']}")
    c = summary["cpu_s_per_sample"]
    print(f"CPU seconds a sample: rollout {c['rollout']}, training {c['train']}: with {summary['cores']} cores no "
          f"pipeline can exceed {summary['cpu_ceiling_samples_per_s']} samples/s")
    print(f"rollout only {summary['rollout_only_samples_per_s']:.3f} samples/s, train only "
          f"{summary['train_only_samples_per_s']:.3f} samples/s; overlap efficiency "
          f"{summary['overlap_efficiency']:.2f} (1.0 = the slower stage never waits)")
    if repeats > 1:
        print(f"per repeat: async/sync {summary['speedup_async_over_sync_runs']}, overlap {overlap}")
    print(f"wrote {out / 'throughput.json'} and {out / 'throughput.png'}")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Throughput benchmark: sync, async with a drained pool, async with "
                                "screenshots by value, full async, rollout alone and training alone, same config; "
                                "writes figures/throughput.*. Every other flag is 05_train.py's (see its --help).")
    p.add_argument("--repeats", type=int, default=1, help="repeats of every variant (medians; default 1)")
    args, rest = p.parse_known_args(argv)
    try:
        cfg, _ = train.resolve(rest)
        train.check(cfg)
    except train.UsageError as e:
        print(f"compare_sync: error: {e}", file=sys.stderr)
        return 2
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    compare_sync(cfg, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
