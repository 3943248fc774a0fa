"""SIGKILL at any moment (`python -m experiments.kill_resume`): a tiny `05_train.py` run is killed at random moments,
some of them while a checkpoint is being written and some while a weight refresh is under way, and resumed with
`--resume` after each kill, until it completes. Checked after every kill and at the end:
  - no checkpoint is half-written: every checkpoints/v* folder loads (model config, weights, trainer state), and
    `latest` names one of them (a kill mid-write leaves only a .tmp folder, which a resume never reads);
  - the run completes, its metrics versions are exactly 1..U (continuous, no row twice);
  - what was in flight at each kill is accounted for: the updates after the resumed checkpoint are dropped from
    metrics.jsonl and trajectories/ and trained again (counted per kill); the episodes running at the kill and the
    groups waiting in the buffer were never trained, so they are simply sampled again.
A moment "during a checkpoint write" is when checkpoints/v*.tmp exists; "during a refresh" is when the refresh's
weight folder (--weights-dir/v*) exists; the parent polls for both every millisecond and kills at once. Writes
figures/kill_resume.json; a short version (two kills) runs in the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from asyncwebrl import ROOT

TRAIN = ["--checkpoint-every", "1", "--keep-checkpoints", "2", "--workers", "4", "--group-size",
         "2", "--batch-groups", "2", "--max-steps", "3", "--no-dynamic-sampling", "--log-trajectories", "1"]


def checkpoints_whole(run: Path) -> tuple[bool, list[str]]:
    """Every finished checkpoint folder loads, and `latest` names one of them."""
    folders = sorted(p for p in (run / "checkpoints").glob("v*") if p.is_dir() and p.suffix != ".tmp")
    for f in folders:
        try:
            json.loads((f / "model" / "config.json").read_text())
            assert any((f / "model").glob("*.safetensors"))
            torch.load(f / "trainer.pt", weights_only=False)
        except Exception:  # noqa: BLE001 (any failure to load is a half-written checkpoint)
            return False, [f.name for f in folders]
    latest = run / "checkpoints" / "latest"
    ok = not latest.exists() or latest.read_text().strip() in [f.name for f in folders]
    return ok, [f.name for f in folders]


def versions(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line)["version"])
        except (ValueError, KeyError, TypeError):
            rows.append(None)  # a row cut by the kill
    return rows


def writing(run: Path) -> dict[str, set]:
    """What is being written now: checkpoint folders not yet renamed into place, refresh weight folders (with their
    creation times, so that a folder a kill left behind is told apart from a new write of the same name)."""
    def stamped(paths):
        out = set()
        for p in paths:
            try:
                out.add((p.name, p.stat().st_mtime_ns))
            except OSError:  # renamed or removed between the listing and the stat
                pass
        return out
    return dict(checkpoint=stamped((run / "checkpoints").glob("v*.tmp")), refresh=stamped((run / "weights").glob("v*")))


def attempt(run: Path, resume: bool, trigger: str | None, rng: random.Random, log, updates: int) -> dict:
    """Start (or resume) the run; kill it when `trigger` happens: during its first or second checkpoint write
    ("checkpoint") or weight refresh ("refresh"), or at a random moment after its first update ("random", 0-15 s
    later: a moment in the start-up alone would test little). None: let it finish."""
    argv = ["--resume", str(run)] if resume else ["--run-dir", str(run), "--weights-dir", str(run / "weights"),
                                                  "--updates", str(updates), *TRAIN]
    proc = subprocess.Popen([sys.executable, str(ROOT / "05_train.py"), *argv], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    t0, nth, delay, rows = time.perf_counter(), rng.randint(1, 2), rng.uniform(0.0, 15.0), len(versions(run))
    old, seen, progress_at = writing(run), set(), None  # what an earlier kill left is not a write of this attempt
    while proc.poll() is None:
        hit = False
        if trigger in ("checkpoint", "refresh"):
            now = writing(run)[trigger] - old[trigger]
            seen |= {name for name, _ in now}
            hit = bool(now) and len(seen) >= nth
        elif trigger == "random":
            if progress_at is None and len(versions(run)) > rows:
                progress_at = time.perf_counter()
            hit = progress_at is not None and time.perf_counter() - progress_at > delay
        if hit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return dict(trigger=trigger, killed=True, after_s=round(time.perf_counter() - t0, 2))
        time.sleep(0.001 if trigger in ("checkpoint", "refresh") else 0.05)  # a write lasts ms; "random" need not
    return dict(trigger=trigger, killed=False, rc=proc.returncode, after_s=round(time.perf_counter() - t0, 2))


def run(folder: Path, kills: int, updates: int = 30, seed: int = 0) -> dict:
    rng = random.Random(seed)
    triggers = ["checkpoint", "refresh"] + [rng.choice(["checkpoint", "refresh", "random", "random"])
                                            for _ in range(max(0, kills - 2))]
    rng.shuffle(triggers)
    run_dir, report = folder / "run", []
    with open(folder / "train.log", "w") as log:
        for n, trigger in enumerate(triggers + [None]):
            before = versions(run_dir)
            r = attempt(run_dir, resume=n > 0 and (run_dir / "config.json").is_file(), trigger=trigger, rng=rng,
                        log=log, updates=updates)
            whole, folders = checkpoints_whole(run_dir)
            latest = run_dir / "checkpoints" / "latest"
            r["latest"] = latest.read_text().strip() if latest.is_file() else None
            r.update(metrics_before=len([v for v in before if v is not None]), versions_after=versions(run_dir),
                     checkpoints=folders, checkpoints_whole=whole)
            if n:  # the kill before this attempt lost the updates after the checkpoint it resumed from: redone
                resumed = int(report[-1]["latest"][1:]) if report[-1]["latest"] else 0
                r.update(resumed_from=resumed, redone=max(0, r["metrics_before"] - resumed))
            report.append(r)
            print(f"[kill-resume] attempt {n}: {r['trigger'] or 'to the end'}, killed={r['killed']} after "
                  f"{r['after_s']} s, metrics rows {len(r['versions_after'])}, checkpoints {folders}", flush=True)
            if not r["killed"]:
                break
    final = versions(run_dir)
    redone = sum(r.get("redone", 0) for r in report)
    checks = dict(completed=not report[-1]["killed"] and report[-1].get("rc") == 0,
                  versions_continuous=final == list(range(1, updates + 1)),
                  no_half_written_checkpoint=all(r["checkpoints_whole"] for r in report),
                  killed_during_checkpoint=sum(r["killed"] and r["trigger"] == "checkpoint" for r in report),
                  killed_during_refresh=sum(r["killed"] and r["trigger"] == "refresh" for r in report))
    passed = all(v for k, v in checks.items() if not k.startswith("killed_during"))
    return dict(kills=sum(r["killed"] for r in report), updates=updates, updates_redone=redone, checks=checks,
                passed=passed and checks["killed_during_checkpoint"] > 0 and checks["killed_during_refresh"] > 0,
                attempts=report)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=10, help="kills before the run may finish (default: 10)")
    p.add_argument("--updates", type=int, default=30, help="updates of the run (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments (default: 0)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "kill_resume", help="default: runs/kill_resume")
    p.add_argument("--out", type=Path, default=ROOT / "figures" / "kill_resume.json",
                   help="default: figures/kill_resume.json")
    args = p.parse_args(argv)
    if args.kills < 2 or args.updates < 2:
        p.error("--kills and --updates must be at least 2 (a kill during a checkpoint write, one during a refresh)")
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    result = run(args.work, args.kills, args.updates, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("kills", "updates", "updates_redone", "checks", "passed")}, indent=1))
    print(f"{'passed' if result['passed'] else 'FAILED'}; written to {args.out}")
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["passed"] else 1)
