"""Issue 8's experiment: does the tiny policy learn, and what do 1/k vs 1/|tau_i| and async vs sync do?

    python -m experiments.learning [--out runs/learn] [--seeds 0 1 2] [--updates N]
    python -m experiments.learning --from runs/learn --out runs/learn40 --updates 40 --variants const-async

One warm start (behaviour cloning, `05_train.py --preset tiny-learn --updates 0`), then from that same model:
    const-async-s<seed>   1/k, async          (the paper's recipe)
    traj-async-s<seed>    1/|tau_i|, async    (the usual normalizer)
    const-sync-s<seed>    1/k, sync           (the baseline pipeline; first seed only unless --sync-seeds)
Each run's final checkpoint and the warm start are evaluated greedily on held-out episodes of the train tasks
(06_eval.py); the 1/k async runs and the warm start also on the out-of-distribution test split. Every step is
skipped when its output exists, so an interrupted experiment continues where it stopped. With --from, the warm
start and the runs of an earlier experiment are copied first and trained on (--resume) to --updates: a longer run
shares its first updates with the shorter one. Writes
OUT/summary.json, copies the logs to figures/logs/<OUT's name> and makes the figures from them (06_eval.py
--figures) in figures/ or --figures DIR.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from asyncwebrl import ROOT


def sh(args: list[str]) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def evaluate(target: Path, split: str, episodes: int, tasks: str = "", temperature: float = 0.0) -> dict:
    out = target / f"eval-model-{split}-{'greedy' if temperature == 0 else f'T={temperature:g}'}.json"
    if not out.is_file():
        sh(["06_eval.py", str(target), "--episodes", str(episodes), "--out", str(out), "--temperature",
            str(temperature)] + (["--tasks", tasks] if tasks else ["--split", split]))
    return json.loads(out.read_text())["slices"]["all"]


def evaluate_both(target: Path, episodes: int, tasks: str) -> dict:
    """Train tasks, held-out episodes: greedy (as the paper evaluates) and at the training temperature 1 (the
    policy RL actually optimises; greedy decoding can hide a change in a probability that stays below 1/2)."""
    return dict(greedy=evaluate(target, "train", episodes, tasks), sampled=evaluate(target, "train", episodes, tasks, 1.0))


VARIANTS = {"const-async": ["--normalizer", "const", "--mode", "async"],  # the paper's recipe
            "traj-async": ["--normalizer", "traj", "--mode", "async"],  # the usual normalizer
            "const-sync": ["--normalizer", "const", "--mode", "sync"]}  # the baseline pipeline


def latest_version(run: Path) -> int | None:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip().lstrip("v")) if latest.is_file() else None


def wall_s(run: Path) -> float:
    """Wall-clock seconds of all of a run's updates so far (its `done` file; 0 before it first finished)."""
    return float((run / "done").read_text().split()[0]) if (run / "done").is_file() else 0.0


def copy_runs(source: Path, out: Path, names: list[str]) -> None:
    """Start from an earlier experiment: its warm start (with its evaluations) and runs (checkpoints, logs)."""
    for name in names:
        if (source / name).is_dir() and not (out / name).exists():
            print(f"copy {source / name} -> {out / name}", flush=True)
            shutil.copytree(source / name, out / name, symlinks=True)


LOG_FILES = ("config.json", "metrics.jsonl", "done", "eval-*.json", "stats.json", "log.jsonl", "summary.json")


def export_logs(out: Path, dirs: list[Path]) -> list[Path]:
    """Copy the small logs (configs, metrics, evaluation tables; no weights, no screenshots) to figures/logs/<out>, so
    the figures and the README's numbers can be checked from the repository alone. Returns the copied run dirs."""
    dest = ROOT / "figures" / "logs" / out.name
    for pattern in LOG_FILES:
        for f in out.rglob(pattern):
            weights = f.parent.name == "model" and pattern == "config.json"  # the model's own config
            if weights or "checkpoints" in f.parts or "trajectories" in f.parts:
                continue
            (dest / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / f.relative_to(out))
    return [dest / d.relative_to(out) for d in dirs]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "learn", help="experiment folder (default: runs/learn)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds (default: 0 1 2)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="which runs to make (default: all three)")
    p.add_argument("--from", dest="source", type=Path, help="an earlier experiment folder: copy its warm start and "
                   "runs, then train them on to --updates")
    p.add_argument("--figures", type=Path, help="folder for the figures (default: figures/)")
    p.add_argument("--sync-seeds", type=int, default=1, help="how many seeds also run the sync baseline (default: 1)")
    p.add_argument("--updates", type=int, default=0, help="updates per run (default: the preset's)")
    p.add_argument("--episodes", type=int, default=10, help="held-out episodes per train task (default: 10)")
    p.add_argument("--test-episodes", type=int, default=3, help="episodes per test-split task (default: 3)")
    p.add_argument("--engine", default="", help="05_train.py's --engine for the RL runs (default: its own)")
    p.add_argument("--no-eval", action="store_true", help="train and draw the figures only (fig. 8 needs no evaluation)")
    args = p.parse_args(argv)
    train = ROOT / "05_train.py"
    from asyncwebrl import load

    preset = load("05_train").PRESETS["tiny-learn"]
    learn_tasks, updates = preset["tasks"], args.updates or preset["updates"]
    ws_run = args.out / "warmstart"
    ws_model = ws_run / "warmstart" / "model"
    runs = [(f"{v}-s{s}", s, VARIANTS[v]) for v in args.variants
            for s in (args.seeds[:args.sync_seeds] if v == "const-sync" else args.seeds)]
    if args.source:
        copy_runs(args.source, args.out, ["warmstart"] + [n for n, _, _ in runs])
    if not (ws_model / "config.json").is_file():
        sh([str(train), "--preset", "tiny-learn", "--updates", "0", "--run-dir", str(ws_run)])
    summary = dict(warmstart={} if args.no_eval else dict(train=evaluate_both(ws_model, args.episodes, learn_tasks),
                                                          test=evaluate(ws_model, "test", args.test_episodes)),
                   runs={})
    for name, seed, flags in runs:
        run = args.out / name
        if latest_version(run) != updates or not (run / "done").is_file():
            t0, before = time.time(), wall_s(run)
            for stale in run.glob("eval-*.json"):  # they describe an earlier checkpoint
                stale.unlink()
            sh([str(train), "--preset", "tiny-learn", "--warmstart-steps", "0", "--model", str(ws_model),
                "--seed", str(seed), "--run-dir", str(run), *flags, "--updates", str(updates),
                *(["--engine", args.engine] if args.engine else []),
                *(["--resume", str(run)] if (run / "config.json").is_file() else [])])
            (run / "done").write_text(f"{before + time.time() - t0:.0f} s\n")
        row = dict(updates=latest_version(run), wall_s=wall_s(run))
        if not args.no_eval:
            row["train"] = evaluate_both(run, args.episodes, learn_tasks)
        if name.startswith("const-async") and not args.no_eval:
            row["test"] = evaluate(run, "test", args.test_episodes)
        summary["runs"][name] = row
    for decoding in () if args.no_eval else ("greedy", "sampled"):
        ws = summary["warmstart"]["train"][decoding]["success"]
        for prefix in ("const-async", "traj-async", "const-sync"):
            gains = [r["train"][decoding]["success"] - ws for n, r in summary["runs"].items() if n.startswith(prefix)]
            if gains:
                summary[f"{prefix}_{decoding}_gain_pp"] = dict(median=100 * statistics.median(gains),
                                                               min=100 * min(gains), max=100 * max(gains),
                                                               seeds=len(gains))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k.endswith("_gain_pp")}, indent=1))
    logs = export_logs(args.out, [ws_run] + [args.out / n for n, _, _ in runs])
    figures = args.figures or ROOT / "figures"  # figures/ also holds throughput.json for fig1
    sh(["06_eval.py", "--figures", *[str(d) for d in logs], str(ROOT / "figures"), "--out", str(figures)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
