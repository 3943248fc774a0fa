"""Faults in 04's rollout pool: what a worker does when the environment, the judge or the worker itself fails.

An episode that ends because of the environment or the judge (01.FAULT_ENDS: a step that hung, a crashed renderer,
a page error, a dead browser, a judge that failed) or whose env raised is not the agent's failure. Training it as
reward 0 would teach the policy that whatever it did before the crash was wrong, so it is never trained: its
screenshots are freed, it is counted under its end reason (Stats.faults_by_end), and its slot of the group runs
again on a fresh env slot, already admitted. After `slot_retries` faults of the same slot the group is abandoned
and its finished trajectories are counted abandoned and freed (the released code's rollout service likewise drops
a task whose rollouts fail). A worker that dies outside an episode is replaced. A long run of groups rejected for
equal rewards is said aloud, since no update can form. A dead engine is not a fault of one episode: it stops the loop.
"""
from __future__ import annotations

import asyncio
import collections

from asyncwebrl.records import free_group


class EpisodeFault(Exception):
    """The episode ended for a reason that is not the agent's (`end`, one of 01.FAULT_ENDS)."""

    def __init__(self, end: str, info: dict):
        super().__init__(f"{end}: {info.get('error') or info.get('judge_error') or 'no detail'}")
        self.end = end


class EngineDead(RuntimeError):
    """The rollout engine is gone: no episode can go on, so the loop stops with this error (never retried)."""


async def on_fault(pool, i: int, slot_env, slot, error: Exception):
    """Count the fault, retry the slot (or abandon its group), and return worker i's fresh env slot."""
    group, j, retries = slot
    end = error.end if isinstance(error, EpisodeFault) else "env_raised"
    pool.stats.faults += 1
    pool.stats.faults_by_end[end] = pool.stats.faults_by_end.get(end, 0) + 1
    said = (str(error).strip().splitlines() or [""])[0][:160]  # Playwright's errors run to many lines
    print(f"[pool] worker {i}: episode of {group.task.id} failed ({type(error).__name__}: {said}); "
          f"restarting its env slot", flush=True)
    await quiet_close(slot_env)
    if retries + 1 < pool.cfg.slot_retries:
        pool.slots.appendleft((group, j, retries + 1))
    else:
        abandon(pool, group)
    return pool.envs.slot(i)


def abandon(pool, group) -> None:
    if pool.open.pop(group.id, None) is not None:
        pool.held -= len(group.trajectories)
        pool.stats.abandoned += len(group.trajectories)
        pool.stats.groups_abandoned += 1
        free_group(pool.store, group)
        pool.slots = collections.deque(s for s in pool.slots if s[0].id != group.id)


def replace_dead(workers: list, start) -> None:
    """A worker task that died anyway (a bug outside its episode) is replaced: the pool keeps its size."""
    for k, t in enumerate(workers):
        if t.done() and not t.cancelled() and t.exception() is not None:
            if isinstance(t.exception(), EngineDead):
                raise t.exception()  # every episode needs the engine: stop the loop, loudly
            print(f"[pool] worker {k} died: {t.exception()!r}; replaced", flush=True)
            workers[k] = asyncio.create_task(start(k))


def warn_if_stalled(pool, reward: float) -> None:
    """A policy that has become deterministic (e.g. a learning rate too high) writes the same reply G times, so every
    group has equal rewards, dynamic sampling rejects them all and no update forms: say so, and again at every
    doubling, instead of a progress bar that silently stops."""
    pool.rejected_in_a_row += 1
    n, first = pool.rejected_in_a_row, max(20, 10 * pool.cfg.batch_groups)
    if n == first or (n > first and n & (n - 1) == 0):  # then at each power of two
        print(f"[pool] the last {n} groups were rejected (each with equal rewards; the last one all {reward:g}): "
              f"no update can form. The policy may have stopped exploring (try a lower --lr) or the tasks are "
              f"solved or unsolvable for it; --no-dynamic-sampling trains on such groups anyway", flush=True)


async def quiet_close(slot_env) -> None:
    try:
        await slot_env.close()
    except Exception:
        pass
