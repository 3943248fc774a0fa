"""The run directory of 05_train.py: the config it ran with (and the commit), metrics.jsonl, the logged
trajectories with their screenshots, and the checkpoints a resume continues from (weights, optimizer state, RNG
states and the task order; written so that a kill at any moment leaves the previous checkpoint whole), plus the
progress bar and the optional TensorBoard / wandb sinks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from asyncwebrl import ROOT, distributed as dist
from asyncwebrl.configs import UsageError


class Run:
    """RUN_DIR: config.json, metrics.jsonl, timeline.jsonl, trajectories/ and checkpoints/ (cfg: 05's TrainConfig)."""

    def __init__(self, cfg):
        self.cfg, self.dir = cfg, Path(cfg.run_dir)
        (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    def save_config(self) -> None:
        write_atomic(self.dir / "config.json", json.dumps(dict(config=dataclasses.asdict(self.cfg),
                                                                 commit=git_commit(), argv=sys.argv[1:]), indent=2))

    def latest_checkpoint(self) -> Path | None:
        latest = self.dir / "checkpoints" / "latest"
        return self.dir / "checkpoints" / latest.read_text().strip() if latest.is_file() else None

    def log_metrics(self, row: dict) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def rewind(self, version: int) -> float:
        """On resume (a no-op for a new run): what came after the checkpoint's version was lost and will be redone,
        so its metrics rows and trajectory folders go. Returns the seconds the run had already spent (its last row
        or timeline span), from which the resumed run's clock counts on."""
        spent = 0.0
        for name, key in (("metrics.jsonl", "time_s"), ("timeline.jsonl", "end")):
            path = self.dir / name
            lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
            rows = [(line, parse_row(line)) for line in lines]
            for _, row in rows:
                spent = max(spent, row.get(key, 0.0) if isinstance(row.get(key), (int, float)) else 0.0)
            if name == "metrics.jsonl" and rows:
                write_atomic(path, "\n".join(line for line, row in rows if row.get("version", 0) <= version))
        for folder in (self.dir / "trajectories").glob("v*"):
            if not folder.name[1:].isdigit() or int(folder.name[1:]) > version:
                shutil.rmtree(folder, ignore_errors=True)
        return spent

    def log_trajectories(self, groups, store, version: int) -> None:
        """The first --log-trajectories trajectories of the update that made `version`: every step's screenshot,
        reply, error, policy version and element boxes (what `06_eval.py --html` shows)."""
        trajs = [(g, t) for g in groups for t in g.trajectories][:self.cfg.log_trajectories]
        for g, t in trajs:
            folder = self.dir / "trajectories" / f"v{version:04d}" / f"traj{t.id}"
            folder.mkdir(parents=True, exist_ok=True)
            steps = []
            for n, s in enumerate(t.steps):
                shot = s.turn.images[-1] if s.turn.images else None
                if shot:
                    (folder / f"step{n:02d}.jpg").write_bytes(store.get(shot))
                steps.append(dict(reply=s.sample.text, action_error=s.action_error, version=s.sample.version,
                                  tokens=len(s.sample.token_ids), screenshot=f"step{n:02d}.jpg" if shot else None,
                                  marks=[list(b) for b in s.marks]))
            (folder / "trajectory.json").write_text(json.dumps(dict(
                task=t.task, difficulty=getattr(g.task, "difficulty", ""), group=t.group, seed=t.seed, reward=t.reward,
                end=t.end, trained_at=version - 1, steps=steps), indent=1))

    def save_checkpoint(self, policy, learner, pool, version: int) -> None:
        """Model files first, then trainer state, then the `latest` pointer (atomic rename): a kill at any point
        leaves the previous checkpoint intact and pointed to."""
        folder = self.dir / "checkpoints" / f"v{version:04d}"
        tmp = folder.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # every rank writes its optimizer shard; the model is gathered
        sharded = isinstance(learner, dist.ShardedLearner)
        policy.save(tmp / "model", learner.save(tmp) if sharded else None)
        torch.save(dict(version=version, torch_rng=torch.get_rng_state(),
                        optimizer=None if sharded else learner.optimizer.state_dict(),
                        python_rng=random.getstate(), task_rng=pool.rng.getstate(),
                        task_order=[t.id for t in pool.order]), tmp / "trainer.pt")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        pointer = self.dir / "checkpoints" / "latest.tmp"
        pointer.write_text(folder.name + "\n")
        os.replace(pointer, self.dir / "checkpoints" / "latest")
        old = sorted(p for p in (self.dir / "checkpoints").glob("v*") if p.is_dir() and p.suffix != ".tmp")
        for stale in old[:-self.cfg.keep_checkpoints] + list((self.dir / "checkpoints").glob("v*.tmp")):
            shutil.rmtree(stale, ignore_errors=True)  # and what a kill mid-write left: never read, only in the way

    def restore(self, ckpt: Path, learner, pool, tasks: list, rank: int = 0, sharded: bool = False) -> int:
        """Continue exactly where the checkpoint was (its weights are loaded with the model): optimizer moments,
        RNGs, the task sampler and the tasks left in its round. Returns the checkpoint's version."""
        state = torch.load(ckpt / "trainer.pt", weights_only=False)
        learner.optimizer.load_state_dict(torch.load(ckpt / f"optimizer.rank{rank}.pt", weights_only=False)
                                          if sharded else state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        pool.rng.setstate(state["task_rng"])
        by_id = {t.id: t for t in tasks}
        pool.order = [by_id[i] for i in state["task_order"] if i in by_id]
        return state["version"]


def parse_row(line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:  # a row cut by a kill mid-write: dropped
        return {"version": 10**9}
    return row if isinstance(row, dict) and isinstance(row.get("version", 0), int) else {"version": 10**9}


def write_atomic(path: Path, text: str) -> None:
    """Write a file that a resume reads: a kill leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n" if text else "")
    os.replace(tmp, path)


def git_commit() -> str:
    head = ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        return (ROOT / ".git" / ref[5:]).read_text().strip()[:12] if ref.startswith("ref: ") else ref[:12]
    except OSError:
        return "unknown"



def extra_loggers(cfg, run_dir: Path) -> list:
    """Optional TensorBoard / wandb sinks for the scalar metrics; metrics.jsonl is always written."""
    sinks = []
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs `pip install tensorboard`")
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        sinks.append(lambda row: [writer.add_scalar(k, v, row["version"]) for k, v in row.items()
                                  if isinstance(v, (int, float))] and writer.flush())
    if cfg.wandb_project:
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb-project needs `pip install wandb`")
        wandb.init(project=cfg.wandb_project, dir=str(run_dir), config=dataclasses.asdict(cfg), resume="allow",
                   id=run_dir.name)
        sinks.append(lambda row: wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))},
                                           step=row["version"]))
    return sinks


def progress_bar(cfg, start: int):
    """One bar on stdout, the numbers a researcher watches in its postfix."""
    from tqdm import tqdm

    return tqdm(total=cfg.updates, initial=start, unit="update", dynamic_ncols=True, file=sys.stdout,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
