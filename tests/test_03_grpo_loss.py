"""The loss math of 03_grpo_loss.py: hand-computed cases, identities, the paper's claim, properties, gradcheck."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncwebrl import load

L = load("03_grpo_loss")
F64 = torch.float64
EPS = 1e-5


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    adv, degenerate = L.group_advantages(rewards, group)
    # group 0: mean 1/4, squared deviations 9/16 + 3 * 1/16 = 3/4; unbiased std sqrt(3/4 / 3) = 1/2 (the released
    # code's default); groups 1 and 2: all equal -> 0
    expected = [0.75 / (0.5 + EPS)] + [-0.25 / (0.5 + EPS)] * 3 + [0.0] * 4
    assert torch.allclose(adv, torch.tensor(expected, dtype=F64))
    assert degenerate == 2
    population, _ = L.group_advantages(rewards, group, std="population")
    std0 = math.sqrt(3) / 4  # sqrt(3/4 / 4)
    expected = [0.75 / (std0 + EPS)] + [-0.25 / (std0 + EPS)] * 3 + [0.0] * 4
    assert torch.allclose(population, torch.tensor(expected, dtype=F64))
    mean_only, _ = L.group_advantages(rewards, group, std_normalize=False)
    assert torch.allclose(mean_only, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], dtype=F64))
    s = 1  # population-std closed form: successes sqrt(f/s), failures -sqrt(s/f)
    assert population[0] == pytest.approx(math.sqrt(3 / s), rel=1e-4)
    assert population[1] == pytest.approx(-math.sqrt(s / 3), rel=1e-4)
    with pytest.raises(ValueError, match="std"):
        L.group_advantages(rewards, group, std="sample")


def test_group_advantages_of_no_trajectories_is_empty_with_no_degenerate_group():
    for std in ("unbiased", "population"):
        adv, degenerate = L.group_advantages(torch.tensor([]), torch.tensor([], dtype=torch.long), std=std)
        assert adv.numel() == 0 and degenerate == 0


def test_step_advantages_by_hand():
    r_hat = torch.tensor([2.0, -1.0], dtype=F64)
    steps = torch.tensor([4, 10])
    assert L.step_advantages(r_hat, steps, "traj", 10).tolist() == [0.5, -0.1]
    assert L.step_advantages(r_hat, steps, "const", 10).tolist() == [0.2, -0.1]
    with pytest.raises(ValueError):
        L.step_advantages(r_hat, steps, "tokens", 10)


def batch(**override):
    """2 trajectories of one group: tau_0 succeeds in 1 step (2 tokens), tau_1 fails in 2 steps (1 and 3 tokens)."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=F64)
    b = dict(logp=torch.zeros(3, 3, dtype=F64, requires_grad=True), prox_logp=torch.zeros(3, 3, dtype=F64),
             behave_logp=torch.zeros(3, 3, dtype=F64), mask=mask, step_traj=torch.tensor([0, 1, 1]),
             traj_reward=torch.tensor([1.0, 0.0], dtype=F64), traj_group=torch.tensor([0, 0]),
             traj_steps=torch.tensor([1, 2]))
    b.update(override)
    return b


R = 0.5 / (math.sqrt(0.5) + EPS)  # |r_hat| of a 1-success/1-failure group: mean 0.5, unbiased std sqrt(1/2)


@pytest.mark.parametrize("normalizer, a0, a1", [("traj", R / 1, -R / 2), ("const", R / 10, -R / 10)])
def test_loss_and_gradient_by_hand(normalizer, a0, a1):
    b = batch()
    loss, metrics = L.grpo_loss(**b, cfg=L.LossConfig(normalizer=normalizer))
    loss.backward()
    # at rho = w = 1 the loss is -(1/|T|) sum_t A_t with |T| = 6 reply tokens; dL/dlogp_t = -A_t / 6
    assert loss.item() == pytest.approx(-(2 * a0 + 4 * a1) / 6)
    expected_grad = -torch.tensor([[a0, a0, 0], [a1, 0, 0], [a1, a1, a1]], dtype=F64) / 6
    assert torch.allclose(b["logp"].grad, expected_grad)
    assert metrics["token_weight_success"] == pytest.approx(abs(a0) / 6)
    assert metrics["token_weight_failure"] == pytest.approx(abs(a1) / 6)
    assert metrics["tokens"] == 6 and metrics["clip_frac"] == 0 and metrics["iw_mean"] == 1


def test_clipping_and_dual_clip_by_hand():
    # token (0,0): A > 0, rho = 1.5 -> clipped at 1.2, no gradient; token (1,0): A < 0, rho = 4 -> PPO gives 4|A|,
    # dual clip caps it at 3|A|, no gradient; every other token sits at rho = 1.
    logp = torch.zeros(3, 3, dtype=F64)
    logp[0, 0], logp[1, 0] = math.log(1.5), math.log(4.0)
    b = batch(logp=logp.requires_grad_(True))
    loss, metrics = L.grpo_loss(**b, cfg=L.LossConfig(normalizer="const"))
    loss.backward()
    a0, a1 = R / 10, -R / 10
    expected = (-a0 * 1.2 - a0 * 1 + 3 * abs(a1) + 3 * (-a1)) / 6
    assert float(loss) == pytest.approx(expected)
    assert b["logp"].grad[0, 0] == 0 and b["logp"].grad[1, 0] == 0
    assert b["logp"].grad[0, 1] == pytest.approx(-a0 / 6)
    # PPO clips only (0,0); for A < 0 and rho > 1 + eps the unclipped branch is the larger one, so only the dual
    # clip bounds token (1,0)
    assert metrics["clip_frac"] == pytest.approx(1 / 6)
    assert metrics["dual_clip_frac"] == pytest.approx(1 / 6)


def test_without_the_dual_clip_a_negative_advantage_at_a_high_ratio_costs_its_full_ratio():
    # the same token (1,0) as above, A < 0 at rho = 4: plain PPO (dual_clip=None) keeps 4 |A| and its gradient
    logp = torch.zeros(3, 3, dtype=F64)
    logp[1, 0] = math.log(4.0)
    b = batch(logp=logp.requires_grad_(True))
    loss, metrics = L.grpo_loss(**b, cfg=L.LossConfig(normalizer="const", dual_clip=None))
    loss.backward()
    a0, a1 = R / 10, -R / 10
    assert float(loss) == pytest.approx((-2 * a0 - 4 * a1 - 3 * a1) / 6)
    assert b["logp"].grad[1, 0] == pytest.approx(-a1 * 4 / 6)
    assert metrics["dual_clip_frac"] == 0 and metrics["clip_frac"] == 0


def test_the_clip_that_binds_for_a_negative_advantage_is_the_lower_one():
    # token (1,0): A < 0 at rho = 0.5 < 1 - eps: the clipped branch -A (1 - eps) is the larger, so the loss is
    # 0.8 |A| and the gradient 0 (the policy may not push this token's probability further down);
    # token (2,0): A < 0 at rho = 1.1, inside the range: the loss is 1.1 |A|, gradient 1.1 |A| / 6;
    # token (0,0): A > 0 at rho = 0.5: the unclipped branch is the larger, so it keeps its gradient -A 0.5 / 6.
    logp = torch.zeros(3, 3, dtype=F64)
    logp[0, 0], logp[1, 0], logp[2, 0] = math.log(0.5), math.log(0.5), math.log(1.1)
    b = batch(logp=logp.requires_grad_(True))
    loss, metrics = L.grpo_loss(**b, cfg=L.LossConfig(normalizer="const"))
    loss.backward()
    a0, a1 = R / 10, -R / 10
    expected = (-a0 * 0.5 - a0 - a1 * 0.8 - a1 * 1.1 - 2 * a1) / 6
    assert float(loss) == pytest.approx(expected)
    grad = b["logp"].grad
    assert grad[1, 0] == 0
    assert grad[2, 0] == pytest.approx(-a1 * 1.1 / 6) and grad[0, 0] == pytest.approx(-a0 * 0.5 / 6)
    assert metrics["clip_frac"] == pytest.approx(1 / 6) and metrics["dual_clip_frac"] == 0


def test_importance_weight_multiplies_and_drops_above_the_cap():
    behave = torch.zeros(3, 3, dtype=F64)
    behave[0, 1] = math.log(1 / 2)  # w = pi_prox / pi_behave = 2: the token counts twice
    behave[2, 2] = math.log(1 / 8)  # w = 8 > 5: dropped
    b = batch(behave_logp=behave)
    loss, metrics = L.grpo_loss(**b, cfg=L.LossConfig(normalizer="const"))
    loss.backward()
    a0, a1 = R / 10, -R / 10
    assert float(loss) == pytest.approx(-(a0 + 2 * a0 + a1 + 2 * a1) / 6)  # |T| stays 6: a dropped token adds 0
    assert b["logp"].grad[2, 2] == 0 and b["logp"].grad[0, 1] == pytest.approx(-2 * a0 / 6)
    assert metrics["iw_max"] == pytest.approx(8) and metrics["iw_over_cap_frac"] == pytest.approx(1 / 6)
    capped, _ = L.grpo_loss(**batch(behave_logp=behave), cfg=L.LossConfig(normalizer="const", iw_mode="cap"))
    assert float(capped) == pytest.approx(-(a0 + 2 * a0 + a1 + a1 + a1 + 5 * a1) / 6)


def random_batch(seed, rows=6, width=5, n_traj=4):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, width, generator=g) < 0.8).to(F64)
    step_traj = torch.arange(rows) % n_traj
    return dict(logp=(-torch.rand(rows, width, generator=g, dtype=F64)).requires_grad_(True),
                prox_logp=-torch.rand(rows, width, generator=g, dtype=F64),
                behave_logp=-torch.rand(rows, width, generator=g, dtype=F64), mask=mask, step_traj=step_traj,
                traj_reward=torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)[:n_traj],
                traj_group=torch.tensor([0, 0, 1, 1])[:n_traj],
                traj_steps=torch.bincount(step_traj, minlength=n_traj))


def test_decoupled_equals_coupled_when_prox_is_behave():
    b = random_batch(0)
    b["prox_logp"] = b["behave_logp"].clone()
    dec, _ = L.grpo_loss(**b, cfg=L.LossConfig(decoupled=True))
    g_dec = torch.autograd.grad(dec, b["logp"])[0]
    cou, _ = L.grpo_loss(**b, cfg=L.LossConfig(decoupled=False))
    g_cou = torch.autograd.grad(cou, b["logp"])[0]
    assert float(dec) == pytest.approx(float(cou)) and torch.allclose(g_dec, g_cou)


def test_on_policy_gradient_is_the_plain_policy_gradient():
    # with logp = prox = behave, grad = -(1/|T|) sum_t A_t grad logp_t, checked through a tiny linear policy
    torch.manual_seed(0)
    theta = torch.randn(4, dtype=F64, requires_grad=True)
    feats = torch.randn(6, 5, 4, dtype=F64)
    b = random_batch(1)
    logp = torch.nn.functional.logsigmoid(feats @ theta)
    b.update(logp=logp, prox_logp=logp.detach(), behave_logp=logp.detach())
    loss, _ = L.grpo_loss(**b)
    (g,) = torch.autograd.grad(loss, theta)
    r_hat, _ = L.group_advantages(b["traj_reward"], b["traj_group"])
    adv = (r_hat / 10)[b["step_traj"]].unsqueeze(1) * b["mask"]
    surrogate = -(adv * torch.nn.functional.logsigmoid(feats @ theta)).sum() / b["mask"].sum()
    (g_pg,) = torch.autograd.grad(surrogate, theta)
    assert torch.allclose(g, g_pg)


def test_normalizers_agree_when_every_trajectory_has_k_steps():
    b = random_batch(2)
    b["traj_steps"] = torch.full((4,), 10)
    traj, _ = L.grpo_loss(**b, cfg=L.LossConfig(normalizer="traj", k=10))
    const, _ = L.grpo_loss(**b, cfg=L.LossConfig(normalizer="const", k=10))
    assert float(traj) == pytest.approx(float(const))


def test_scaling_rewards_leaves_the_std_normalised_loss_unchanged():
    b = random_batch(3)
    base, _ = L.grpo_loss(**b)
    scaled, _ = L.grpo_loss(**{**b, "traj_reward": b["traj_reward"] * 7.5})
    assert float(scaled) == pytest.approx(float(base), rel=1e-4)


def test_permuting_trajectories_inside_a_group_changes_nothing():
    b = random_batch(4)
    base, _ = L.grpo_loss(**b)
    perm = torch.tensor([1, 0, 3, 2])  # swap within group 0 and within group 1
    inv = torch.argsort(perm)
    permuted = {**b, "traj_reward": b["traj_reward"][perm], "traj_group": b["traj_group"][perm],
                "traj_steps": b["traj_steps"][perm], "step_traj": inv[b["step_traj"]]}
    assert float(L.grpo_loss(**permuted)[0]) == pytest.approx(float(base))


@pytest.mark.parametrize("s, f, Ls, Lf", [(1, 3, 5, 12), (2, 2, 3, 9), (3, 5, 4, 13)])
def test_paper_claim_negative_mass_grows_by_Lf_over_Ls_under_1_over_k(s, f, Ls, Lf):
    trajs = [dict(reward=1, group=0, tokens=[4] * Ls)] * s + [dict(reward=0, group=0, tokens=[4] * Lf)] * f

    def masses(normalizer):
        b = L.pack(trajs)
        loss, _ = L.grpo_loss(**b, cfg=L.LossConfig(normalizer=normalizer))
        loss.backward()
        push = -b["logp"].grad  # per-token push on log-prob
        return float(push[push < 0].sum().abs()), float(push[push > 0].sum())

    neg_traj, pos_traj = masses("traj")
    neg_const, pos_const = masses("const")
    assert (neg_const / pos_const) / (neg_traj / pos_traj) == pytest.approx(Lf / Ls)


@pytest.mark.parametrize("s, f, Ts, Tf", [(2, 6, 5, 12), (4, 4, 3, 9), (5, 3, 6, 6), (1, 7, 8, 4)])
def test_a_pattern_in_every_step_gets_zero_push_under_traj_and_negative_under_const(s, f, Ts, Tf):
    # one token per step stands for a pattern repeated in every step (c = 1); its net push is the sum of pushes
    trajs = [dict(reward=1, group=0, tokens=[1] * Ts)] * s + [dict(reward=0, group=0, tokens=[1] * Tf)] * f

    def net(normalizer):
        b = L.pack(trajs)
        cfg = L.LossConfig(normalizer=normalizer, adv_eps=0.0, std="population")  # the closed form's std
        loss, metrics = L.grpo_loss(**b, cfg=cfg, n_tokens=1)  # undo the 1/|T| so the coefficient is exact
        loss.backward()
        return float(-b["logp"].grad.sum())

    assert net("traj") == pytest.approx(0.0, abs=1e-9)
    assert net("const") == pytest.approx(math.sqrt(s * f) / 10 * (Ts - Tf))


def test_token_agg_step_averages_tokens_inside_each_step():
    b = batch()
    loss, _ = L.grpo_loss(**b, cfg=L.LossConfig(normalizer="const", token_agg="step"))
    a0, a1 = R / 10, -R / 10
    assert float(loss) == pytest.approx(-(a0 + a1 + a1) / 3)  # every step weighs the same, whatever its length
    with pytest.raises(ValueError):
        L.grpo_loss(**batch(), cfg=L.LossConfig(token_agg="sequence"))


def test_empty_and_all_masked_batches_give_zero_not_nan():
    b = batch(mask=torch.zeros(3, 3, dtype=F64))
    loss, metrics = L.grpo_loss(**b)
    loss.backward()
    assert float(loss) == 0 and torch.isfinite(b["logp"].grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
    b = batch(mask=torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=F64))  # one empty step
    loss, _ = L.grpo_loss(**b, cfg=L.LossConfig(token_agg="step"))
    assert math.isfinite(float(loss))


def test_metrics_split_success_and_failure_and_count_degenerate_groups():
    b = batch(traj_reward=torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64), traj_group=torch.tensor([0, 0, 1, 1]),
              traj_steps=torch.tensor([1, 2, 1, 1]))
    _, m = L.grpo_loss(**b)
    assert m["degenerate_groups"] == 1
    assert m["adv_success_mean"] == pytest.approx(R / 3)  # (R + 0 + 0) / 3 successes
    assert m["adv_failure_mean"] == pytest.approx(-R)
    logp = torch.full((3, 3), -0.1, dtype=F64, requires_grad=True)
    _, m = L.grpo_loss(**batch(logp=logp, prox_logp=torch.full((3, 3), -0.05, dtype=F64)))
    assert m["approx_kl_behave"] == pytest.approx(0.1) and m["approx_kl_prox"] == pytest.approx(0.05)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 6), n_traj=st.integers(1, 4), seed=st.integers(0, 10**6),
       scale=st.floats(0.01, 4.0), decoupled=st.booleans(), normalizer=st.sampled_from(["traj", "const"]),
       token_agg=st.sampled_from(["batch", "step"]), iw_mode=st.sampled_from(["drop", "cap"]))
def test_properties_finite_loss_bounded_clip_fraction_and_no_token_above_the_cap(
        rows, width, n_traj, seed, scale, decoupled, normalizer, token_agg, iw_mode):
    g = torch.Generator().manual_seed(seed)
    n_traj = min(n_traj, rows)
    step_traj = torch.randint(0, n_traj, (rows,), generator=g)
    step_traj[:n_traj] = torch.arange(n_traj)
    b = dict(logp=(scale * torch.randn(rows, width, generator=g, dtype=F64)).requires_grad_(True),
             prox_logp=scale * torch.randn(rows, width, generator=g, dtype=F64),
             behave_logp=scale * torch.randn(rows, width, generator=g, dtype=F64),
             mask=(torch.rand(rows, width, generator=g) < 0.7).to(F64), step_traj=step_traj,
             traj_reward=torch.randint(0, 2, (n_traj,), generator=g).to(F64),
             traj_group=torch.randint(0, 2, (n_traj,), generator=g), traj_steps=torch.bincount(step_traj))
    cfg = L.LossConfig(decoupled=decoupled, normalizer=normalizer, token_agg=token_agg, iw_mode=iw_mode)
    loss, m = L.grpo_loss(**b, cfg=cfg)
    loss.backward()
    assert math.isfinite(float(loss)) and torch.isfinite(b["logp"].grad).all()
    assert 0 <= m["clip_frac"] <= 1 and 0 <= m["clip_frac_coupled"] <= 1 and 0 <= m["dual_clip_frac"] <= 1
    assert all(math.isfinite(v) for v in m.values())
    if decoupled and iw_mode == "drop":
        over = torch.exp(b["prox_logp"] - b["behave_logp"]) > cfg.iw_cap
        assert (b["logp"].grad[over] == 0).all()  # a token above the threshold contributes nothing


def test_gradcheck_float64():
    b = random_batch(5, rows=3, width=3, n_traj=2)
    b["traj_reward"], b["traj_group"] = b["traj_reward"][:2], b["traj_group"][:2]
    b["step_traj"] = torch.tensor([0, 1, 1])
    b["traj_steps"] = torch.tensor([1, 2])
    # keep every ratio away from the clip boundaries, where the loss is not differentiable
    logp = b.pop("logp").detach().clone().requires_grad_(True)
    b["prox_logp"] = logp.detach().clone() + 0.05
    b["behave_logp"] = logp.detach().clone()
    assert torch.autograd.gradcheck(lambda x: L.grpo_loss(x, **b)[0], (logp,))


def test_pack_pads_short_steps_with_masked_columns_in_float64():
    b = L.pack([dict(reward=1, group=0, tokens=[2, 3]), dict(reward=0, group=0, tokens=[1])])
    assert b["mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert b["step_traj"].tolist() == [0, 0, 1] and b["traj_steps"].tolist() == [2, 1]
    assert b["traj_reward"].dtype == b["mask"].dtype == b["logp"].dtype == F64  # exact hand-worked checks
    assert b["traj_reward"].tolist() == [1.0, 0.0] and b["traj_group"].tolist() == [0, 0]
    assert b["logp"].requires_grad and not b["prox_logp"].any() and not b["behave_logp"].any()


def test_clip_rates_of_fig5_by_hand_when_the_behaviour_policy_is_stale():
    """pi_theta = pi_prox, pi_behave = pi_prox / 2 on every token: the coupled ratio pi_theta / pi_behave is 2, so
    PPO clips the 2 tokens of positive advantage (for A < 0 at ratio 2 the unclipped branch is the larger); the
    decoupled ratio pi_theta / pi_prox is 1 and clips nothing; every importance weight is 2."""
    b = batch(behave_logp=torch.full((3, 3), math.log(0.5), dtype=F64))
    for decoupled in (True, False):
        _, m = L.grpo_loss(**b, cfg=L.LossConfig(decoupled=decoupled))
        assert m["clip_frac_coupled"] == pytest.approx(2 / 6) and m["clip_frac_decoupled"] == 0
        assert m["clip_frac"] == (0 if decoupled else pytest.approx(2 / 6))
        assert m["iw_mean"] == pytest.approx(2.0) and m["iw_max"] == pytest.approx(2.0)
        assert m["approx_kl_behave"] == pytest.approx(math.log(0.5)) and m["approx_kl_prox"] == 0
        assert m["dual_clip_frac"] == 0 and m["iw_over_cap_frac"] == 0 and m["tokens"] == 6


def test_boundaries_the_mutation_run_found_untested():
    """Edges no other test pinned down (each found by mutation testing, tests/MUTATION.md)."""
    # an importance weight exactly at the cap is kept: only tokens *above* it are dropped (w = exp(2 ln 2) = 4)
    b = batch(prox_logp=torch.full((3, 3), 2 * math.log(2.0), dtype=F64))
    _, m = L.grpo_loss(**b, cfg=L.LossConfig(iw_cap=4.0))
    assert m["iw_mean"] == 4.0 and m["iw_over_cap_frac"] == 0
    # token_agg="step": a step row with no reply token is not a step; one step of 2 tokens: loss = -A
    zeros = torch.zeros(2, 2, dtype=F64)
    one = dict(logp=zeros.clone().requires_grad_(True), prox_logp=zeros, behave_logp=zeros,
               mask=torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=F64), step_traj=torch.tensor([0, 1]),
               traj_reward=torch.tensor([1.0, 0.0], dtype=F64), traj_group=torch.tensor([0, 0]),
               traj_steps=torch.tensor([1, 1]))
    loss, _ = L.grpo_loss(**one, cfg=L.LossConfig(token_agg="step"))
    assert float(loss) == pytest.approx(-R / 10)
    # a metric over one token is that token's value; over no token it is 0
    single = dict(one, mask=torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64),
                  behave_logp=torch.full((2, 2), -math.log(2.0), dtype=F64))
    m = L.grpo_loss(**single)[1]
    assert m["iw_mean"] == pytest.approx(2.0) and m["token_weight_success"] == pytest.approx(R / 10)  # |A| / 1 token
    _, empty = L.grpo_loss(**dict(one, mask=torch.zeros(2, 2, dtype=F64)))
    assert empty["clip_frac"] == 0 and empty["iw_mean"] == 0 and empty["iw_max"] == 0 and empty["tokens"] == 0
    # a batch with no success (no failure) has no mean advantage of successes (failures): 0, not a made-up value
    for rewards, key in (([0.0, 0.0], "adv_success_mean"), ([1.0, 1.0], "adv_failure_mean")):
        assert L.grpo_loss(**dict(one, traj_reward=torch.tensor(rewards, dtype=F64)))[1][key] == 0
    # the loss comes out in the model's dtype (float32 here), whatever the mask's (bool, as Policy.logprobs gives)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in batch().items()}
    f32["logp"] = f32["logp"].detach().requires_grad_(True)
    loss, _ = L.grpo_loss(**dict(f32, mask=f32["mask"] > 0))
    assert loss.dtype == torch.float32
    # bad choices are named
    with pytest.raises(ValueError, match="normalizer must be 'traj' or 'const'"):
        L.step_advantages(torch.zeros(1), torch.ones(1), "tokens", 10)
    with pytest.raises(ValueError, match="token_agg must be 'batch' or 'step'"):
        L.grpo_loss(**batch(), cfg=L.LossConfig(token_agg="token"))
