"""06 - Evaluation by difficulty slice, and the paper's figures regenerated from run logs.

    python 06_eval.py runs/<run> --split test           the run's latest checkpoint, greedy, on the test split
    python 06_eval.py runs/<run>/checkpoints/v0008 --split train --episodes 20 --temperature 1.0
    python 06_eval.py --agent oracle --split train      the ceiling: scripted solvers (where MiniWoB++ has one)
    python 06_eval.py --agent random --split train      the floor: uniformly random actions over the marks
    python 06_eval.py --figures runs/a runs/b ...       figures/fig*.png + .json from the runs' logs alone
    python 06_eval.py --html runs/<run>                 runs/<run>/report.html: every logged episode, step by step

Evaluation plays held-out instances: seeds from 01's TRAIN_SEEDS upward, which training never draws. The test
split holds task families never trained on (out-of-distribution, as in the paper). Every success rate comes with a
95% confidence interval (Wilson score: right near 0 and 1, where the normal approximation is not).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from pathlib import Path

from asyncwebrl import ROOT, load, suites
from asyncwebrl.episodes import play, print_progress
from asyncwebrl.oracle import SOLVABLE, oracle_action, random_action

env = load("01_env")
policy_mod = load("02_policy")

SLICES = ("easy", "medium", "hard")


# ----------------------------------------------------------------------------------------------------------------
# Agents: act(episodes) -> [(Response, reply tokens)], one per running episode (asyncwebrl/episodes.py plays them).


class ModelAgent:
    """A policy checkpoint: greedy (temperature 0) or sampled, every running episode in one batch."""

    def __init__(self, sampler, store, greedy: bool):
        self.sampler, self.store, self.greedy = sampler, store, greedy

    def act(self, episodes) -> list:
        turns = [self.sampler.turn(ep.obs, ep.state) for ep in episodes]
        samples = self.sampler.sample(turns, self.store, greedy=self.greedy)
        return [(policy_mod.parse_response(s.text, s.truncated), len(s.token_ids)) for s in samples]


class OracleAgent:
    """The scripted solvers; a task without one gives up at once (and is left out of the oracle's table)."""

    def act(self, episodes) -> list:
        actions = [oracle_action(ep.task.id.split("/")[-1], ep.obs) for ep in episodes]
        return [(policy_mod.Response("", a or env.Action("answer", text=""), str(a)), 0) for a in actions]


class RandomAgent:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def act(self, episodes) -> list:
        return [(policy_mod.Response("", a, str(a)), 0) for a in (random_action(ep.obs, self.rng) for ep in episodes)]


# ----------------------------------------------------------------------------------------------------------------
# The table: success with its 95% interval, steps and tokens for successes and failures, per slice.


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(records: list[dict]) -> dict:
    ok, bad = [r for r in records if r["success"]], [r for r in records if not r["success"]]
    lo, hi = wilson(len(ok), len(records))
    return dict(episodes=len(records), success=_mean([r["success"] for r in records]), ci95=[lo, hi],
                steps_success=_mean([r["steps"] for r in ok]), steps_failure=_mean([r["steps"] for r in bad]),
                tokens_success=_mean([r["tokens"] for r in ok]), tokens_failure=_mean([r["tokens"] for r in bad]),
                faults=sum(r.get("end") in env.FAULT_ENDS for r in records))  # failures that were not the agent's


def table(records: list[dict]) -> dict:
    rows = {"all": summarize(records)}
    rows.update({s: summarize([r for r in records if r["difficulty"] == s]) for s in SLICES})
    tasks = sorted({r["task"] for r in records})
    return dict(slices=rows, tasks={t: summarize([r for r in records if r["task"] == t]) for t in tasks})


def format_table(result: dict, title: str) -> str:
    f = lambda x: "   -" if x != x else f"{x:4.1f}"  # noqa: E731  (nan: no episode of that kind)
    lines = [title, f"{'slice':8} {'n':>4} {'success':>8} {'95% CI':>13}  {'steps ok/fail':>13}  {'tokens ok/fail':>15}"]
    for name, s in result["slices"].items():
        if s["episodes"]:
            lines.append(f"{name:8} {s['episodes']:4d} {s['success']:8.1%} [{s['ci95'][0]:4.0%}, {s['ci95'][1]:4.0%}]  "
                         f"{f(s['steps_success'])} / {f(s['steps_failure'])}  "
                         f"{f(s['tokens_success']):>6} / {f(s['tokens_failure'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def eval_jobs(tasks: list, episodes: int) -> list:
    """Held-out instances: the same seeds TRAIN_SEEDS + i for every agent, so tables compare like with like."""
    return [(t, env.TRAIN_SEEDS + i) for i in range(episodes) for t in tasks]


def evaluate(agent, tasks: list, episodes: int, store=None, workers: int = 8, label: str = "eval",
             save_to: Path | None = None) -> list[dict]:
    """One record per episode. `save_to`: every step's screenshot is written there (e<n>/stepNN.jpg) and each
    record's `trace` lists its steps (memory, action, error, element boxes): what `--html` shows."""
    store = store if store is not None else env.ScreenshotStore()
    played = play(agent, eval_jobs(tasks, episodes), store, workers, keep_screenshots=save_to is not None,
                  progress=print_progress(label))
    records = [ep.record() for ep in played]
    for n, (ep, record) in enumerate(zip(played, records) if save_to is not None else []):
        record["trace"] = []
        for k, step in enumerate(ep.trace):
            shot, path = step.pop("screenshot"), save_to / f"e{n}" / f"step{k:02d}.jpg"
            if shot in store.keys(ep.name):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(store.get(shot))
            saved = f"{save_to.name}/e{n}/{path.name}" if path.exists() else None
            record["trace"].append({**step, "screenshot": saved})
        store.free(ep.name)
    return records


def resolve_model(target: str | Path) -> tuple[Path, dict]:
    """A model directory from a run directory (its latest checkpoint), a checkpoint, or a model directory; and the
    run's config (prompt settings must match what the model was trained with), when there is one."""
    path = Path(target)
    if (path / "checkpoints" / "latest").is_file():
        path = path / "checkpoints" / (path / "checkpoints" / "latest").read_text().strip()
    if (path / "model").is_dir():
        path = path / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{target}: not a run directory, a checkpoint or a model directory "
                                f"(no {path / 'config.json'})")
    run_cfg = {}
    for parent in path.absolute().parents:  # not resolve(): a checkpoint's model may be a link elsewhere
        cfg_file = parent / "config.json"
        if cfg_file.is_file() and "config" in (saved := json.loads(cfg_file.read_text())):
            run_cfg = saved["config"]
            break
    return path, run_cfg


def model_agent(target: str | Path, store, temperature: float = 0.0) -> ModelAgent:
    path, run_cfg = resolve_model(target)
    names = ("history", "images", "max_new_tokens", "memory_tokens")
    pcfg = policy_mod.PolicyConfig(model=str(path), temperature=temperature or 1.0,
                                   **{k: run_cfg[k] for k in names if k in run_cfg})
    if run_cfg.get("constrained") in ("on", "off"):
        pcfg.constrained = run_cfg["constrained"] == "on"
    return ModelAgent(policy_mod.HFSampler(pcfg), store, greedy=temperature == 0)


def select_tasks(split: str, names: str, agent: str) -> list:
    tasks = suites.miniwob_tasks(split=None if names else split,
                              names=[n.strip() for n in names.split(",")] if names else None)
    if agent == "oracle":  # the ceiling is measured where a ceiling exists
        tasks = [t for t in tasks if t.id.split("/")[-1] in SOLVABLE]
    return tasks


def run_eval(args) -> dict:
    tasks = select_tasks(args.split, args.tasks, args.agent)
    # resolved once, before the episodes: a training run's "latest" may move on while they play
    model_dir, run_cfg = resolve_model(args.target) if args.agent == "model" else (None, {})
    horizon = args.max_steps or run_cfg.get("max_steps", 0)
    if horizon:  # the horizon the policy was trained with (05's --max-steps), unless --max-steps says otherwise
        tasks = [dataclasses.replace(t, max_steps=horizon) for t in tasks]
    if not tasks:
        raise ValueError(f"no tasks to evaluate (split={args.split!r}, tasks={args.tasks!r}, agent={args.agent})")
    store = env.ScreenshotStore()
    if args.agent == "model":
        agent, name = model_agent(model_dir, store, args.temperature), str(args.target)
    else:
        agent, name = (OracleAgent() if args.agent == "oracle" else RandomAgent(args.seed)), args.agent
    mode = "scripted" if args.agent != "model" else "greedy" if args.temperature == 0 else f"T={args.temperature:g}"
    split = args.split if not args.tasks else "tasks"
    out = Path(args.out or ((Path(args.target) if args.agent == "model" else ROOT / "figures")
                            / f"eval-{args.agent}-{split}-{mode}.json"))
    records = evaluate(agent, tasks, args.episodes, store, args.workers, label=f"eval {name}",
                       save_to=out.with_suffix("") if args.agent == "model" else None)  # a model's steps: the viewer
    result = dict(target=name, model=str(model_dir) if model_dir else None, agent=args.agent,
                  split=split, mode=mode, episodes_per_task=args.episodes,
                  max_steps=horizon or "task's own", **table(records), records=records)
    print(format_table(result, f"{name} ({args.agent}, {mode}) on {result['split']}: {len(tasks)} tasks x "
                               f"{args.episodes} episodes"))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {out}")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("target", nargs="?", help="run directory, checkpoint (checkpoints/vNNNN) or model directory")
    p.add_argument("--agent", choices=("model", "oracle", "random"), default="model",
                   help="model: the TARGET checkpoint (default); oracle / random: the built-in ceiling / floor")
    p.add_argument("--split", choices=("train", "test"), default="test",
                   help="task split (default: test, the out-of-distribution families)")
    p.add_argument("--tasks", default="", help="comma-separated MiniWoB++ task names instead of a split")
    p.add_argument("--episodes", type=int, default=10, help="held-out episodes per task (default: 10)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples at that temperature")
    p.add_argument("--max-steps", type=int, default=0,
                   help="episode horizon; 0 = the run's own (05's --max-steps), else the task's (default: 0)")
    p.add_argument("--workers", type=int, default=8, help="episodes played side by side (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="random agent's seed (default: 0)")
    p.add_argument("--out", help="where the JSON table goes (default: beside the checkpoint, or figures/); with "
                   "--figures, the folder the figures go to (default: figures/)")
    p.add_argument("--figures", nargs="+", metavar="RUN_DIR", help="regenerate the figures from these runs' logs")
    p.add_argument("--html", metavar="RUN_DIR", help="write RUN_DIR/report.html: the run's curves and every logged "
                   "episode, step by step (opens from disk)")
    return p


def main(argv=None) -> int:
    policy_mod.quiet_libraries()
    p = parser()
    args = p.parse_args(argv)
    try:
        if args.html:
            from asyncwebrl.report import write_report

            out = write_report(Path(args.html))
            print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB; it shows the run's own screenshots): open it in "
                  f"a browser")
            return 0
        if args.figures:
            from asyncwebrl.figures import make_figures

            make_figures([Path(d) for d in args.figures], args.out)
            return 0
        if args.agent == "model" and not args.target:
            p.error("give a run directory, checkpoint or model directory to evaluate (or --agent oracle|random)")
        if args.episodes < 1:
            p.error("--episodes must be at least 1")
        run_eval(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"06_eval.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
