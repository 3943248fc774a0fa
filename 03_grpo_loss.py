"""03 - Multi-step GRPO with the decoupled PPO objective: pure tensor math, no I/O, no model, no browser.

A batch is a set of *steps* (one model reply each). Step rows are padded to [S, T] reply tokens; every row knows
its trajectory (`step_traj`), and every trajectory its reward, its group (G trajectories of one task) and its
length |tau_i| in steps. Three log-probs per token:
    behave  the policy that sampled the token (the rollout engine, possibly several versions old)
    prox    the proximal policy = the trainer's weights at the start of this train step (one recomputed forward)
    logp    the policy being optimised (carries the gradient)

Where the gradient goes (this is the paper's argument). The loss is the mean over all |T| reply tokens of the
batch, so at rho = w = 1 token t of step j of trajectory i is pushed with weight A_ij / |T|, where
    traj  ("1/|tau_i|", usual multi-step GRPO)  A_ij = r_hat_i / |tau_i|
    const ("1/k", the paper's fix, k = 10)       A_ij = r_hat_i / k
Per trajectory (n_i reply tokens in total), the total weight is r_hat_i * n_i / (|tau_i| |T|) under traj (each
trajectory gets one "vote", spread over its steps) and r_hat_i * n_i / (k |T|) under const (proportional to
length). With the paper's numbers, failures ~12.5 steps and successes ~5.1: under traj a failed token is pushed
with |r_hat_-| / 12.5 against r_hat_+ / 5.1 for a successful one, i.e. 12.5 / 5.1 = ~2.4x less per unit of
advantage than under const, where every token of every step gets r_hat_i / k. Long failures go unpunished, so
verbose trajectories survive; const removes the coupling between length and per-token weight.

`token_agg="step"` (an ablation) first averages the tokens of each step, then averages the steps: a token then
gets A_ij / (|tau_ij| S) (S = steps in the batch), which also divides by the reply's own length |tau_ij| and so
dilutes the push on long, verbose replies.

`python 03_grpo_loss.py` prints a worked example and writes figures/normalizer_weights.png.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossConfig:
    normalizer: str = "const"  # "const": A = r_hat / k (paper); "traj": A = r_hat / |tau_i| (usual GRPO)
    k: float = 10.0  # the Easy training horizon, as in the paper
    std_normalize: bool = True  # r_hat = (r - mean) / (std + eps); False: r_hat = r - mean ("mean-only")
    std: str = "unbiased"  # the group std: "unbiased" (1/(G-1), torch.std's default, as the released code) or
    # "population" (1/G, as the paper's docs write it); for G = 8 the two differ by sqrt(8/7), 7%
    adv_eps: float = 1e-5
    decoupled: bool = True  # clip pi_theta / pi_prox and weight by pi_prox / pi_behave; False: clip pi_theta / pi_behave
    eps_clip: float = 0.2
    dual_clip: float | None = 3.0  # cap the loss of negative-advantage tokens at c * |A|
    iw_cap: float = 5.0  # importance weights w = pi_prox / pi_behave above this ...
    iw_mode: str = "drop"  # ... are dropped from the loss (released code), or "cap": w = min(w, iw_cap)
    token_agg: str = "batch"  # "batch": mean over all reply tokens (released code); "step": per-step token mean


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, std_normalize: bool = True, eps: float = 1e-5,
                     std: str = "unbiased"):
    """r_hat_i = (r_i - mean_g(r)) / (std_g(r) + eps), the std over the G trajectories of group g taken with
    1/(G-1) ("unbiased") or 1/G ("population"). Returns (r_hat [N], number of groups whose rewards are all equal:
    they carry zero advantage)."""
    if std not in ("unbiased", "population"):
        raise ValueError(f"std must be 'unbiased' or 'population', got {std!r}")
    rewards = rewards.double()
    _, inverse = torch.unique(group, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if len(group) else 0

    def per_group_sum(x):  # on x's device (GPU too)
        return torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)

    count = per_group_sum(torch.ones_like(rewards))
    mean = per_group_sum(rewards) / count
    centred = rewards - mean[inverse]
    var = per_group_sum(centred**2) / ((count - 1).clamp(min=1) if std == "unbiased" else count)
    degenerate = int((var == 0).sum())
    adv = centred / (var.sqrt()[inverse] + eps) if std_normalize else centred
    return adv, degenerate


def step_advantages(r_hat: torch.Tensor, traj_steps: torch.Tensor, normalizer: str, k: float) -> torch.Tensor:
    """The advantage every reply token of every step of trajectory i receives: r_hat_i / |tau_i| or r_hat_i / k."""
    if normalizer == "traj":
        return r_hat / traj_steps.clamp(min=1).to(r_hat.dtype)
    if normalizer == "const":
        return r_hat / k
    raise ValueError(f"normalizer must be 'traj' or 'const', got {normalizer!r}")


def ppo_token_loss(logp, prox_logp, behave_logp, adv, cfg: LossConfig):
    """Per-token PPO loss (to minimise) and the masks the metrics need. All inputs [S, T]; works in log space.
        rho = pi_theta / pi_prox (decoupled) or pi_theta / pi_behave (coupled)
        pg  = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)),  then  pg = min(pg, c |A|)  (dual clip, bites if A < 0)
        w   = pi_prox / pi_behave (detached; 1 when coupled),  loss_t = w * pg, tokens with w > cap dropped."""
    anchor = prox_logp if cfg.decoupled else behave_logp
    ratio = torch.exp(logp - anchor.detach())
    clipped_ratio = ratio.clamp(1 - cfg.eps_clip, 1 + cfg.eps_clip)
    plain, clipped = -adv * ratio, -adv * clipped_ratio
    pg = torch.maximum(plain, clipped)
    clip_mask = clipped.detach() > plain.detach()
    dual_mask = torch.zeros_like(clip_mask)
    if cfg.dual_clip is not None:
        bound = cfg.dual_clip * adv.abs()
        dual_mask = (adv < 0) & (pg.detach() > bound)
        pg = torch.minimum(pg, bound)
    if cfg.decoupled:
        w = torch.exp((prox_logp - behave_logp).detach())
    else:
        w = torch.ones_like(ratio)
    over_cap = w > cfg.iw_cap
    keep = ~over_cap if cfg.iw_mode == "drop" else torch.ones_like(over_cap)
    w = w.clamp(max=cfg.iw_cap) if cfg.iw_mode == "cap" else w
    return w * pg, dict(clip=clip_mask, dual=dual_mask, w=w, over_cap=over_cap, keep=keep)


def grpo_loss(logp, prox_logp, behave_logp, mask, step_traj, traj_reward, traj_group, traj_steps,
              cfg: LossConfig = LossConfig(), n_tokens: int | float | None = None):
    """The AsyncWebRL loss of one (mini)batch.
    logp, prox_logp, behave_logp, mask: [S, T] per reply token of each step row (mask 0 = padding / prompt).
    step_traj: [S] trajectory index of each row. traj_reward, traj_group, traj_steps: [N] per trajectory.
    n_tokens: the global token count |T| to divide by (default: this call's mask sum; pass the whole batch's when
    splitting it into minibatches). Returns (scalar loss, dict of float metrics)."""
    mask = mask.to(logp.dtype)
    r_hat, degenerate = group_advantages(traj_reward, traj_group, cfg.std_normalize, cfg.adv_eps, cfg.std)
    step_adv = step_advantages(r_hat, traj_steps, cfg.normalizer, cfg.k).to(logp.dtype)
    adv = step_adv[step_traj].unsqueeze(1).expand_as(logp)  # broadcast to every reply token of the step
    token_loss, m = ppo_token_loss(logp, prox_logp, behave_logp, adv, cfg)
    live = mask * m["keep"].to(mask.dtype)  # tokens that count: reply tokens whose importance weight is kept
    if cfg.token_agg == "batch":
        denom = float(n_tokens) if n_tokens is not None else float(mask.sum())
        loss = (token_loss * live).sum() / max(denom, 1.0)
    elif cfg.token_agg == "step":
        per_step = (token_loss * live).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_step.sum() / max(int((mask.sum(1) > 0).sum()), 1)
    else:
        raise ValueError(f"token_agg must be 'batch' or 'step', got {cfg.token_agg!r}")
    return loss, _metrics(logp, prox_logp, behave_logp, mask, adv, m, r_hat, step_traj, traj_reward, degenerate, cfg,
                          n_tokens)


def _masked_mean(x, mask):
    return float((x * mask).sum() / mask.sum()) if mask.sum() > 0 else 0.0


def _metrics(logp, prox_logp, behave_logp, mask, adv, m, r_hat, step_traj, traj_reward, degenerate, cfg, n_tokens):
    with torch.no_grad():
        return _metrics_of(logp.detach(), prox_logp, behave_logp, mask, adv, m, r_hat, step_traj, traj_reward,
                           degenerate, cfg, n_tokens)


def _metrics_of(logp, prox_logp, behave_logp, mask, adv, m, r_hat, step_traj, traj_reward, degenerate, cfg,
                n_tokens=None):
    n = float(mask.sum())
    coupled = ppo_token_loss(logp, prox_logp, behave_logp, adv, LossConfig(**{**cfg.__dict__, "decoupled": False}))[1]
    decoupled = ppo_token_loss(logp, prox_logp, behave_logp, adv, LossConfig(**{**cfg.__dict__, "decoupled": True}))[1]
    success = (traj_reward[step_traj] > 0).unsqueeze(1).to(mask.dtype) * mask
    failure = mask - success
    weight = adv.abs() / max(float(n_tokens) if n_tokens else n, 1.0)  # gradient weight of a token at rho = w = 1
    w_success, w_failure = _masked_mean(weight, success), _masked_mean(weight, failure)
    traj_success = traj_reward > 0
    return {
        "tokens": n,
        "clip_frac": _masked_mean(m["clip"].to(mask.dtype), mask),
        "clip_frac_coupled": _masked_mean(coupled["clip"].to(mask.dtype), mask),
        "clip_frac_decoupled": _masked_mean(decoupled["clip"].to(mask.dtype), mask),
        "dual_clip_frac": _masked_mean(m["dual"].to(mask.dtype), mask),
        "iw_mean": _masked_mean(decoupled["w"], mask),
        "iw_max": float((decoupled["w"] * mask).max()) if n else 0.0,
        "iw_over_cap_frac": _masked_mean(decoupled["over_cap"].to(mask.dtype), mask),
        "approx_kl_behave": _masked_mean(behave_logp - logp, mask),  # k1 estimate of KL(behave || theta)
        "approx_kl_prox": _masked_mean(prox_logp - logp, mask),
        "adv_success_mean": float(r_hat[traj_success].mean()) if traj_success.any() else 0.0,
        "adv_failure_mean": float(r_hat[~traj_success].mean()) if (~traj_success).any() else 0.0,
        "token_weight_success": w_success,  # means over this call's success / failure tokens, of which there are
        "token_weight_failure": w_failure,
        "tokens_success": float(success.sum()),  # these many (a caller that splits a batch weights by them)
        "degenerate_groups": degenerate,
    }


# ----------------------------------------------------------------------------------------------------------------
# Worked example and figure


def pack(trajectories: list[dict]):
    """Toy batch builder: trajectories = [{"reward": r, "group": g, "tokens": [n_tokens of each step]}]. All
    three log-probs are zero (on-policy, rho = w = 1). Returns the grpo_loss arguments as a dict."""
    rows = [(i, n) for i, t in enumerate(trajectories) for n in t["tokens"]]
    width = max(n for _, n in rows)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for _, n in rows], dtype=torch.float64)
    zeros = torch.zeros_like(mask)
    return dict(logp=zeros.clone().requires_grad_(True), prox_logp=zeros, behave_logp=zeros, mask=mask,
                step_traj=torch.tensor([i for i, _ in rows]),
                traj_reward=torch.tensor([float(t["reward"]) for t in trajectories], dtype=torch.float64),
                traj_group=torch.tensor([t["group"] for t in trajectories]),
                traj_steps=torch.tensor([len(t["tokens"]) for t in trajectories]))


def main():
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Worked example of the 1/|tau_i| vs 1/k normalizers; writes "
                                                 "figures/normalizer_weights.png")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "figures", help="output folder")
    args = parser.parse_args()
    # Two groups of 4: successes are short (2-3 steps), failures long (6-8 steps), 5 reply tokens per step.
    trajs = [dict(reward=r, group=g, tokens=[5] * n) for g, spec in enumerate([[(1, 2), (1, 3), (0, 6), (0, 8)],
                                                                               [(1, 3), (0, 6), (0, 7), (0, 8)]])
             for r, n in spec]
    print("trajectory  group reward steps | per-token weight x 1e3:  1/|tau_i|    1/k (k=10)")
    for normalizer in ("traj", "const"):
        batch = pack(trajs)
        loss, metrics = grpo_loss(**batch, cfg=LossConfig(normalizer=normalizer))
        loss.backward()
        per_row = -batch["logp"].grad[:, 0]  # d(-loss)/d logp of the first token of each step row
        trajs_w = [float(per_row[batch["step_traj"] == i][0]) for i in range(len(trajs))]
        for t, w in zip(trajs, trajs_w):
            t[normalizer] = w
        print(f"  {normalizer:5s}: token weight success {metrics['token_weight_success']:.2e}  failure "
              f"{metrics['token_weight_failure']:.2e}  (failure/success = "
              f"{metrics['token_weight_failure'] / metrics['token_weight_success']:.2f})")
    for i, t in enumerate(trajs):
        print(f"  tau_{i}        {t['group']}     {t['reward']}     {len(t['tokens'])}   |"
              f"                  {1e3 * t['traj']:+8.3f}    {1e3 * t['const']:+8.3f}")
    _figure(args.out / "normalizer_weights.png")


def _figure(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = torch.arange(1, 31, dtype=torch.float64)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(lengths, 1 / lengths, label="1/|tau_i| (usual multi-step GRPO)")
    a.plot(lengths, torch.full_like(lengths, 1 / 10), label="1/k, k = 10 (AsyncWebRL)")
    for steps, name in ((5.1, "successes"), (12.5, "failures")):
        a.axvline(steps, color="grey", ls=":")
        a.text(steps + 0.3, 0.9, f"paper's mean\n{name}: {steps}", fontsize=8)
    a.set(xlabel="trajectory length |tau_i| (steps)", ylabel="gradient weight per token / |r_hat_i|",
          title="Per-token push on a trajectory of a given length", yscale="log")
    a.legend(fontsize=8)
    # Net push on a token pattern repeated in every step (population-std advantages, s = f = 4, T_s = 5):
    ratio = torch.linspace(0.5, 4, 50, dtype=torch.float64)
    s = f = 4
    b.plot(ratio, torch.zeros_like(ratio), label="1/|tau_i|: always 0")
    b.plot(ratio, (s * f) ** 0.5 / 10 * (5 - 5 * ratio), label="1/k: (sqrt(s f) / k) (T_s - T_f)")
    b.set(xlabel="T_f / T_s (failure length / success length)", ylabel="net coefficient on the pattern's log-prob",
          title="A per-step pattern (e.g. verbose memory)")
    b.legend(fontsize=8)
    fig.suptitle("03_grpo_loss.py: where the normalizer puts the gradient (analytic)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
