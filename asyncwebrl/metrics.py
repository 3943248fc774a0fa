"""Per-update metrics of the loop (figs. 2-4 and the staleness the paper bounds): of the trained batch, and of every
trajectory that finished since the last update (the honest learning curve). 04_async_loop.py's trainer thread logs
them with each update.
"""
from __future__ import annotations


def rollout_metrics(trajs: list) -> dict:
    """Every trajectory finished since the last update, rejected groups included: the honest learning curve (the
    trained batch is biased towards 50% success, since dynamic sampling keeps only groups with mixed rewards)."""
    ok, bad = [t for t in trajs if t.reward > 0], [t for t in trajs if t.reward <= 0]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return dict(rollout_trajectories=len(trajs), rollout_success=mean([t.reward > 0 for t in trajs]),
                rollout_steps=mean([len(t.steps) for t in trajs]),
                rollout_steps_success=mean([len(t.steps) for t in ok]),
                rollout_steps_failure=mean([len(t.steps) for t in bad]),
                rollout_tokens_per_step=mean([len(s.sample.token_ids) for t in trajs for s in t.steps]))


def batch_metrics(groups: list, version: int) -> dict:
    trajs = [t for g in groups for t in g.trajectories]
    steps = [s for t in trajs for s in t.steps]
    ok, bad = [t for t in trajs if t.reward > 0], [t for t in trajs if t.reward <= 0]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return dict(success=mean([t.reward > 0 for t in trajs]), trajectories=len(trajs), samples=len(steps),
                steps=mean([len(t.steps) for t in trajs]), steps_success=mean([len(t.steps) for t in ok]),
                steps_failure=mean([len(t.steps) for t in bad]),
                tokens_per_step=mean([len(s.sample.token_ids) for s in steps]),
                invalid_actions=mean([s.action_error is not None for s in steps]),
                staleness_mean=mean([version - s.sample.version for s in steps]),
                staleness_max=max(version - s.sample.version for s in steps))
