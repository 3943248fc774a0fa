"""Warm start: behaviour cloning on scripted demonstrations, standing in for the pretrained VLM the paper starts
from (no weights can be downloaded here). `05_train.py --warmstart-steps N` runs it before RL.

Demonstrations are made in-process: the scripted MiniWoB++ solvers (asyncwebrl/oracle.py) play the real pages and
every step is written in the policy's own reply format (02: "Memory: ...\\nAction: ...") on the very prompt the
policy sees, so cloning teaches the grammar, the memory field and which mark the goal names. On purpose, a
fraction `verbose` of the demonstrations is wordy, like the pretrained agents in the paper: one or two redundant
`scroll(down)` steps before acting, and a long memory line at every step. RL has that to remove (or keep): 06's
figures follow steps and tokens per trajectory over training.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from asyncwebrl import load
from asyncwebrl.episodes import play, print_progress
from asyncwebrl.oracle import SOLVABLE, oracle_action

env = load("01_env")
policy_mod = load("02_policy")


@dataclass
class WarmstartConfig:
    steps: int = 60  # optimizer steps of behaviour cloning
    episodes: int = 160  # demonstrations played (failed ones are dropped)
    batch: int = 16  # replies per optimizer step
    lr: float = 1e-3  # AdamW; dense supervision of a small model takes a larger step than RL
    verbose: float = 0.5  # fraction of demonstrations with redundant steps and a wordy memory
    workers: int = 8  # episodes played side by side
    seed: int = 0  # seeds the demonstrations (tasks, instances, which are verbose) and the cloning batches


WORDY = ("goal read, page elements checked, nothing done yet; next: {plan}",  # ~20 memory tokens, the
         "the goal and the page are checked; my next action: {plan}",  # concise form ~5: the budget is 24
         "read the goal, checked the elements; next action is to {plan}")


def _ascii(text: str) -> str:
    return re.sub(r"[^ -~]", "", text)[:24]


def _plan(action, obs) -> str:
    """A short, true description of the action: what the memory line says comes next."""
    if action.kind == "scroll":
        return "look further down"
    el = obs.elements[action.mark] if action.mark is not None and action.mark < len(obs.elements) else None
    name = _ascii(el.text or el.tag) if el is not None else "it"
    return f'type "{_ascii(action.text)}" into {name}' if action.kind == "type" else f"{action.kind} {name}"


class Demonstrator:
    """An agent for asyncwebrl.episodes.play: the oracle's action, sometimes after redundant scrolls, with a memory
    line; it records (turn, reply) of every step, the turn built exactly as the policy would see it."""

    def __init__(self, prompter, grammar, cfg: WarmstartConfig):
        self.prompter, self.grammar, self.cfg = prompter, grammar, cfg
        self.rng = random.Random(cfg.seed)
        self.eos = prompter.tokenizer.eos_token_id

    def tokens(self, turn, reply: str) -> list[int] | None:
        ids = self.prompter.tokenizer(reply, add_special_tokens=False)["input_ids"] + [self.eos]
        if self.grammar is not None:
            try:
                self.grammar.masks(turn.n_marks, ids)  # the sampler could write exactly this reply
            except ValueError:
                return None
        return ids

    def act(self, episodes) -> list:
        out = []
        for ep in episodes:
            if "wordy" not in ep.scratch:
                ep.scratch.update(wordy=self.rng.random() < self.cfg.verbose, demos=[])
                ep.scratch["pad"] = self.rng.choice([1, 2]) if ep.scratch["wordy"] else 0
            if ep.scratch["pad"] > 0:
                ep.scratch["pad"] -= 1
                action = env.Action("scroll", text="down")
            else:  # the solvers count their own steps (click ONE at step 0, TWO at 1): redundant ones do not count
                real = dataclasses.replace(ep.obs, step=ep.scratch.setdefault("real", 0))
                ep.scratch["real"] += 1
                action = oracle_action(ep.task.id.split("/")[-1], real) or env.Action("answer", text="")  # give up
            plan = _plan(action, ep.obs)
            turn = self.prompter.turn(ep.obs, ep.state)
            reply = f"Memory: {self.rng.choice(WORDY).format(plan=plan) if ep.scratch['wordy'] else plan}\nAction: {action}"
            ids = self.tokens(turn, reply)
            if ids is None:  # too wordy for the memory budget: the short form
                reply = f"Memory: {plan}\nAction: {action}"
                ids = self.tokens(turn, reply)
            ep.scratch["demos"].append((turn, ids))
            out.append((policy_mod.parse_response(reply), len(ids or [])))
        return out


def collect(policy, tasks: list, cfg: WarmstartConfig, store) -> tuple[list, dict]:
    """Demonstrations (turn, reply token ids) from the successful oracle episodes; their screenshots stay in store."""
    solvable = [t for t in tasks if t.id.split("/")[-1] in SOLVABLE]
    if not solvable:
        raise ValueError("warm start: no task with a scripted solver among the training tasks "
                         f"(solvers exist for: {', '.join(SOLVABLE)})")
    rng = random.Random(cfg.seed)
    jobs = [(solvable[i % len(solvable)], rng.randrange(env.TRAIN_SEEDS)) for i in range(cfg.episodes)]
    agent = Demonstrator(policy, policy.grammar, cfg)
    episodes = play(agent, jobs, store, cfg.workers, keep_screenshots=True, progress=print_progress("demonstrations"))
    demos = [(turn, ids) for ep in episodes if ep.reward > 0 for turn, ids in ep.scratch["demos"] if ids is not None]
    for ep in episodes:
        if ep.reward <= 0:
            store.free(ep.name)
    ok = [ep for ep in episodes if ep.reward > 0]
    stats = dict(demo_episodes=len(episodes), demo_success=len(ok) / max(1, len(episodes)), demo_steps=len(demos),
                 demo_steps_per_episode=sum(ep.steps for ep in ok) / max(1, len(ok)),
                 demo_tokens_per_step=sum(len(ids) for _, ids in demos) / max(1, len(demos)))
    if not demos:
        raise RuntimeError("warm start: the scripted solvers succeeded on no episode; nothing to clone")
    return demos, stats


def clone(policy, demos: list, store, cfg: WarmstartConfig, log=None) -> list[float]:
    """Behaviour cloning: maximise log pi(reply | prompt) of the demonstrations, token-averaged (the same masked,
    temperature-scaled distribution the sampler draws from). Returns the loss of every step."""
    from tqdm import tqdm

    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=cfg.lr)
    rng, order, losses = random.Random(cfg.seed), [], []
    bar = tqdm(range(cfg.steps), desc="warm start", unit="step", file=sys.stdout, dynamic_ncols=True)
    for step in bar:
        if len(order) < cfg.batch:  # shuffled passes over the demonstrations
            order += rng.sample(range(len(demos)), len(demos))
        batch, order = [demos[i] for i in order[:cfg.batch]], order[cfg.batch:]
        logp, mask = policy.logprobs([t for t, _ in batch], [ids for _, ids in batch], store)
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix_str(f"loss {losses[-1]:.3f}")
        if log is not None:
            log(dict(step=step + 1, loss=losses[-1]))
    return losses


def warm_start(policy, tasks: list, cfg: WarmstartConfig, folder: Path) -> None:
    """Collect the demonstrations, clone them into `policy`, save it to `folder` (atomically: written as .tmp, then
    renamed) with the cloning's loss log and data stats beside it. ValueError or RuntimeError: nothing to learn from."""
    print(f"warm start: {cfg.episodes} scripted demonstration episodes, then {cfg.steps} behaviour-cloning "
          f"steps of {cfg.batch} replies")
    store, t0 = env.ScreenshotStore(), time.time()
    demos, stats = collect(policy, tasks, cfg, store)
    folder.parent.mkdir(parents=True, exist_ok=True)
    t1 = time.time()
    with open(folder.parent / "log.jsonl", "w") as log:
        losses = clone(policy, demos, store, cfg, log=lambda row: log.write(json.dumps(row) + "\n"))
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(tmp)
    os.replace(tmp, folder)
    stats.update(loss_first=losses[0], loss_last=losses[-1], steps=cfg.steps, batch=cfg.batch, lr=cfg.lr,
                 verbose_fraction=cfg.verbose, collect_s=round(t1 - t0), clone_s=round(time.time() - t1))
    (folder.parent / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"warm start: {stats['demo_steps']} demonstration steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"{stats['collect_s'] + stats['clone_s']} s; saved {folder}")
