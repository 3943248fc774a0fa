"""What flows from 04's rollout pool to its trainer thread, and the ledger that counts it.

A Trajectory is the list of Steps of one episode; a Group holds the G trajectories of one task instance (same task,
same seed), the unit of GRPO. A Step keeps the turn (prompt text and screenshot *keys*) and the sample (token ids,
behaviour log-probs, the policy version that wrote it): screenshots stay in 01's store and only keys travel, except
in the by-value ablation. Stats is the ledger of 04_async_loop.py: every episode begun ends in exactly one of its
counters. The learner (learner.py), the metrics (metrics.py) and the run directory (rundir.py) read these records.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Step:
    turn: object  # 02.Turn: prompt text + screenshot keys + number of marks
    sample: object  # 02.Sample: token ids, behaviour log-probs, policy version
    action_error: str | None  # why the reply was not a valid action (None: it was)
    image_bytes: dict | None = None  # only in the by-value ablation: key -> the screenshot's bytes
    marks: tuple = ()  # the boxes (x, y, w, h) of the element marks the model saw: where click(#i) lands (viewer)


@dataclass
class Trajectory:
    id: int
    group: int
    task: str
    seed: int
    episode: str  # ScreenshotStore episode name
    steps: list[Step] = field(default_factory=list)
    reward: float = 0.0
    end: str = ""  # 01's end reason: task_done, answer, max_steps, blocked_navigation (the agent's)
    t_start: float = 0.0
    t_end: float = 0.0

    @property
    def versions(self) -> list[int]:
        return [s.sample.version for s in self.steps]


@dataclass
class Group:
    id: int
    task: object  # 01.Task
    seed: int
    trajectories: list[Trajectory] = field(default_factory=list)

    def staleness(self, version: int) -> int:
        return version - min(v for t in self.trajectories for v in t.versions)


def free_group(store, group: Group) -> None:
    for t in group.trajectories:
        store.free(t.episode)


@dataclass
class Stats:
    """The ledger: started = finished + faults + cut + running; every finished trajectory is then trained, rejected,
    dropped, abandoned, or still waiting (Loop.ledger)."""
    started: int = 0  # episodes begun (an episode hit by a fault is begun again in the same slot)
    finished: int = 0  # trajectories completed by the agent (an end reason of the agent's, 01.AGENT_ENDS)
    trained: int = 0
    rejected: int = 0  # in groups with all-equal rewards (dynamic sampling)
    dropped_stale: int = 0  # in groups older than max_staleness at consumption (drop_stale only)
    abandoned: int = 0  # finished, in groups given up after a slot kept failing
    faults: int = 0  # episodes ended by the environment or the judge, not the agent: run again, never trained
    cut: int = 0  # episodes running when the loop stopped: neither trained nor a fault
    groups_rejected: int = 0
    groups_dropped: int = 0
    groups_trained: int = 0
    groups_abandoned: int = 0
    inference_calls: int = 0
    inference_replies: int = 0
    refreshes_checked: int = 0  # weight refreshes whose engine digest matched the trainer's
    faults_by_end: dict = field(default_factory=dict)  # end reason (or "env_raised") -> episodes

    def row(self) -> dict:
        """The counters as flat numbers, for a metrics row (faults_by_end as fault_<reason>)."""
        flat = {k: v for k, v in self.__dict__.items() if k != "faults_by_end"}
        return {**flat, **{f"fault_{k}": v for k, v in sorted(self.faults_by_end.items())}}
