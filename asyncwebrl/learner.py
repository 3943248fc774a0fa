"""The learner: one update of the policy on B complete groups, decoupled PPO + multi-step GRPO (03's loss on
02's Policy). Used by 04_async_loop.py's trainer thread; 05_train.py builds it, asyncwebrl/distributed.py shards it.

In order: the behaviour log-probs come with the samples (pi_behave); pi_prox is computed once, with the weights at
the start of the update, before the first minibatch (the released code's `recompute_logprob`); then `epochs`
passes of `minibatches` optimizer steps each, every step a sum of the 03 loss over micro-batches (gradient
accumulation). With world > 1, rank r owns rows r, r + world, ... of every minibatch, and the token-weighted
metrics add up over ranks to the batch's means.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import torch

from asyncwebrl import load, weights

loss_mod = load("03_grpo_loss")


def by_value(group, store):
    """The ablation of lightweight screenshot handling: every step carries its screenshots' bytes, and the group
    crosses to the trainer serialised and deserialised, as through an object store between processes."""
    import pickle

    for t in group.trajectories:
        for s in t.steps:
            s.image_bytes = {k: store.get(k) for k in s.turn.images}
    return pickle.loads(pickle.dumps(group))


class StepImages:
    """Screenshot lookup for the learner: bytes carried by the steps (by-value ablation), else the store."""

    def __init__(self, steps: list, store):
        self.carried = {k: v for s in steps if s.image_bytes for k, v in s.image_bytes.items()}
        self.store = store

    def get(self, key: str) -> bytes:
        return self.carried[key] if key in self.carried else self.store.get(key)


@dataclass
class LearnerConfig:
    lr: float = 1e-4  # tiny model from scratch; the paper's 8B uses 5e-6
    weight_decay: float = 0.01  # AdamW's decoupled decay
    grad_clip: float = 1.0  # max global gradient norm per optimizer step
    epochs: int = 1  # passes over the batch (released code: 3)
    minibatches: int = 1  # optimizer steps per pass (released code: 2); pi_prox is computed once, before them all
    micro_batch: int = 16  # steps per forward/backward (gradient accumulation): bounds activation memory


class Learner:
    """Turns B groups into one (or a few) optimizer steps of the 03 loss on the 02 Policy."""

    def __init__(self, policy, store, loss_cfg=None, cfg: LearnerConfig | None = None, rank: int = 0,
                 world: int = 1):
        self.policy, self.store, self.rank, self.world = policy, store, rank, world  # world > 1: see 05_train.py
        self.loss_cfg, self.cfg = loss_cfg or loss_mod.LossConfig(), cfg or LearnerConfig()
        params = [p for p in policy.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _logprobs(self, steps: list):
        return self.policy.logprobs([s.turn for s in steps], [s.sample.token_ids for s in steps],
                                    StepImages(steps, self.store))

    def _my_chunks(self, idx: list[int]) -> list[list[int]]:
        """This rank's micro-batches of rows `idx` (data parallel: rank r owns the rows r, r + world, ..., for pi_prox
        and for the loss alike). Every rank gets the same number of chunks: a sharded model gathers its weights in
        each forward, so all ranks must run the same count; a rank short of rows runs an empty chunk (a forward
        with zero weight)."""
        micro = self.cfg.micro_batch
        owned = [[r for r in idx if r % self.world == rank] for rank in range(self.world)]
        n = max(-(-len(rows) // micro) for rows in owned)
        mine = owned[self.rank]
        return [mine[a * micro:(a + 1) * micro] for a in range(n)]

    def update(self, groups: list) -> dict:
        if self.policy.device.type == "cuda":  # the current device is per thread: the trainer's starts on cuda:0
            torch.cuda.set_device(self.policy.device)
        trajs = [t for g in groups for t in g.trajectories]
        rows = [(i, s) for i, t in enumerate(trajs) for s in t.steps]
        width = max(len(s.sample.token_ids) for _, s in rows)
        traj_args = dict(traj_reward=torch.tensor([t.reward for t in trajs]),
                         traj_group=torch.tensor([t.group for t in trajs]),
                         traj_steps=torch.tensor([len(t.steps) for t in trajs]))
        behave = torch.zeros(len(rows), width)
        for r, (_, s) in enumerate(rows):
            behave[r, :len(s.sample.logprobs)] = torch.tensor(s.sample.logprobs)
        with torch.no_grad():  # pi_prox: the weights at the start of this train step, one forward
            prox = torch.zeros(len(rows), width)
            for c in self._my_chunks(list(range(len(rows)))):
                lp, _ = self._logprobs([rows[r][1] for r in (c or [0])])
                if c:
                    prox[c, :lp.shape[1]] = lp.float().cpu()
        metrics = collections.defaultdict(float)
        per_mb, n_steps = -(-len(rows) // self.cfg.minibatches), self.cfg.epochs * self.cfg.minibatches
        shuffle = torch.Generator().manual_seed(trajs[0].id * 7919 + len(rows))  # the same order on every rank
        minibatches = [order[mb * per_mb:(mb + 1) * per_mb] for _ in range(self.cfg.epochs)
                       for order in [torch.randperm(len(rows), generator=shuffle).tolist()]
                       for mb in range(self.cfg.minibatches)]
        for idx in minibatches:
            n_tokens = sum(len(rows[r][1].sample.token_ids) for r in idx)  # |T| of the whole minibatch
            n_success = sum(len(rows[r][1].sample.token_ids) for r in idx if trajs[rows[r][0]].reward > 0)
            for c in self._my_chunks(idx):
                logp, mask = self._logprobs([rows[r][1] for r in (c or idx[:1])])
                T = logp.shape[1]
                loss, m = loss_mod.grpo_loss(logp.float(), prox[c or idx[:1], :T].to(logp.device),
                                             behave[c or idx[:1], :T].to(logp.device), mask,
                                             torch.tensor([rows[r][0] for r in (c or idx[:1])], device=logp.device),
                                             cfg=self.loss_cfg, n_tokens=n_tokens,
                                             **{k: v.to(logp.device) for k, v in traj_args.items()})
                # a sharded model averages gradients over ranks; the loss is a sum over the minibatch's tokens
                (loss * (self.world if c else 0.0)).backward()
                if not c:
                    continue
                metrics["loss"] += float(loss.detach()) / n_steps
                share = float(mask.sum()) / n_tokens / n_steps  # token-weighted means over chunks and steps
                # the token weights are means over the success (failure) tokens: weighted by those tokens' share
                shares = dict(token_weight_success=m["tokens_success"] / max(n_success, 1) / n_steps,
                              token_weight_failure=(float(mask.sum()) - m["tokens_success"])
                              / max(n_tokens - n_success, 1) / n_steps)
                for k, v in m.items():
                    if k == "iw_max":
                        metrics[k] = max(metrics[k], v)
                    elif k in ("tokens", "tokens_success", "degenerate_groups"):  # counts: of one pass
                        metrics[k] = v if k == "degenerate_groups" else metrics[k] + v / self.cfg.epochs
                    else:
                        metrics[k] += v * shares.get(k, share)
            norm = torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), self.cfg.grad_clip)
            metrics["grad_norm"] += float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm) / n_steps
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return self._gather_metrics(dict(metrics))

    def _gather_metrics(self, metrics: dict) -> dict:
        """Sharded: every rank measured its rows; token-weighted sums add up to the batch's means."""
        if self.world == 1:
            return metrics
        import torch.distributed as dist

        keys = sorted(k for k in metrics if k not in ("iw_max", "degenerate_groups", "grad_norm"))
        on = dict(dtype=torch.float64, device=self.policy.device)  # NCCL reduces CUDA tensors only
        total = torch.tensor([metrics.get(k, 0.0) for k in keys], **on)
        peak = torch.tensor([metrics.get("iw_max", 0.0)], **on)
        dist.all_reduce(total)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        return {**metrics, **dict(zip(keys, total.tolist())), "iw_max": float(peak)}

    def publish(self, folder: Path, dtype: torch.dtype | None = None) -> str:
        """The weights for the rollout engine, as files (asyncwebrl/weights.py); returns their digest."""
        return weights.write(self.policy.model.state_dict().items(), folder, dtype)


def release_heap() -> None:
    """Hand the heap that freed CPU tensors left behind back to the system (glibc's malloc_trim; elsewhere nothing).
    Prompts and pages change shape every step, so torch and numpy free buffers of ever new sizes from several
    threads, and glibc keeps most of them: in the fault soak the process grew from 3.1 to 4.9 GB over 1000 episodes
    without this call, and stayed within 0.5-1.0 GB in use with it (figures/NOTEBOOK.md). 04's trainer calls it
    after every update."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator is its own business
        pass
