"""04's Learner on the real tiny policy: the sign of the update is right, and on-policy data gives ratio 1."""
import math

import pytest
import torch

from asyncwebrl import load

env = load("01_env")
pol = load("02_policy")
aloop = load("04_async_loop")
loss_mod = load("03_grpo_loss")


def group_of(policy, replies_rewards, gid=0):
    obs = env.Observation(goal="Click on the OK button.", url="x", screenshot="ep:0",
                          elements=(env.Element(0, "button", "OK", (1.0, 1.0, 9.0, 9.0)),
                                    env.Element(1, "button", "No", (1.0, 20.0, 9.0, 9.0))))
    turn = policy.turn(obs, pol.AgentState())
    trajs = []
    for i, (reply, reward) in enumerate(replies_rewards):
        ids = policy.tokenizer(reply)["input_ids"] + [policy.tokenizer.eos_token_id]
        with torch.no_grad():
            lp, _ = policy.logprobs([turn], [ids], policy_store)
        sample = pol.Sample(reply, ids, lp[0].tolist(), version=0, truncated=False)
        trajs.append(aloop.Trajectory(i, gid, "t", 0, f"e{i}", [aloop.Step(turn, sample, None)], reward=reward))
    return aloop.Group(gid, None, 0, trajs)


policy_store = None


@pytest.fixture
def policy(tiny_dir, shot_store):
    global policy_store
    policy_store = shot_store
    torch.manual_seed(0)
    return pol.Policy(pol.PolicyConfig(model=str(tiny_dir)))


def test_updates_raise_the_successful_reply_and_lower_the_failed_one(policy, shot_store):
    good, bad = "Memory: OK\nAction: click(#0)", "Memory: no\nAction: click(#1)"
    learner = aloop.Learner(policy, shot_store, cfg=aloop.LearnerConfig(lr=3e-3))
    group = group_of(policy, [(good, 1.0), (bad, 0.0)])
    before = [sum(s.sample.logprobs) for t in group.trajectories for s in t.steps]
    first = learner.update([group])
    for _ in range(4):
        learner.update([group_of(policy, [(good, 1.0), (bad, 0.0)])])
    after = [sum(s.sample.logprobs) for t in group_of(policy, [(good, 1.0), (bad, 0.0)]).trajectories
             for s in t.steps]
    assert after[0] > before[0] + 1.0 and after[1] < before[1] - 1.0
    # on-policy first update: behaviour = proximal = current weights, so every importance weight is 1
    assert abs(first["iw_mean"] - 1) < 1e-4 and abs(first["approx_kl_prox"]) < 1e-5 and first["clip_frac"] == 0
    assert first["loss"] != 0 and first["grad_norm"] > 0 and first["tokens"] > 0


def test_micro_batching_gives_the_same_gradient_step(tiny_dir, shot_store):
    global policy_store
    policy_store = shot_store
    replies = [("Memory: a\nAction: click(#0)", 1.0), ("Memory: bb b\nAction: click(#1)", 0.0),
               ("Memory: \nAction: scroll(down)", 0.0), ('Memory: x\nAction: type(#0, "hi")', 1.0)]
    weights, metrics = [], []
    for micro in (1, 16):
        torch.manual_seed(0)
        p = pol.Policy(pol.PolicyConfig(model=str(tiny_dir), dtype="float32"))  # fp32 on a GPU too: exact sums
        learner = aloop.Learner(p, shot_store, cfg=aloop.LearnerConfig(micro_batch=micro, grad_clip=1e9))
        learner.optimizer = torch.optim.SGD(p.model.parameters(), lr=1.0)  # step = -gradient: compare gradients
        start = p.model.get_input_embeddings().weight.detach().clone()
        metrics.append(learner.update([group_of(p, replies)]))
        weights.append(p.model.get_input_embeddings().weight.detach() - start)
    assert weights[0].abs().max() > 1e-4
    assert torch.allclose(weights[0], weights[1], atol=1e-6)
    for key in metrics[0]:  # every metric too: means over success or failure tokens included
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-4, abs=1e-7), key


class ThetaPolicy:
    """A policy whose log-prob of token k is log_softmax(theta)[k] whatever the prompt: the Learner's bookkeeping
    (pi_prox, importance weights, minibatches) can be checked by hand. Records every log-prob call."""

    def __init__(self, vocab=6):
        self.model = torch.nn.Module()
        self.model.theta = torch.nn.Parameter(torch.linspace(-1.0, 1.0, vocab, dtype=torch.float64))
        self.device, self.calls = torch.device("cpu"), []

    def logprobs(self, turns, responses, store):
        self.calls.append((torch.is_grad_enabled(), self.model.theta.detach().clone(), sorted(map(tuple, responses))))
        lp, width = self.model.theta.log_softmax(-1), max(map(len, responses))
        logp = torch.stack([torch.cat([lp[torch.tensor(r)], lp.new_zeros(width - len(r))]) for r in responses])
        mask = torch.tensor([[t < len(r) for t in range(width)] for r in responses])
        return logp, mask


def test_decoupled_learner_computes_pi_prox_once_and_weights_by_pi_prox_over_pi_behave(monkeypatch):
    """2 epochs x 2 minibatches of off-policy data (pi_behave != pi_prox): pi_prox is one no-grad pass over every row
    at the start weights, before the first optimizer step, and never again; the importance weights the loss uses
    are pi_prox / pi_behave (known here by construction), with the tokens above the cap counted."""
    policy = ThetaPolicy()
    theta0 = policy.model.theta.detach().clone()
    lp0 = theta0.log_softmax(-1)
    ratio = {0: 0.5, 1: 2.0, 2: 1.0, 3: 6.0, 4: 1.5, 5: 0.8}  # w = pi_prox / pi_behave of each token id; 6 > cap
    # replies of equal length, so that the metrics' mean over minibatches is the mean over tokens
    replies = [([0, 1], 1.0), ([2, 3], 0.0), ([3, 4], 1.0), ([1, 2], 0.0), ([4, 5], 0.0), ([5, 0], 0.0)]  # 3rd: all 0
    groups, n = [], 0
    for g, members in enumerate((replies[:2], replies[2:4], replies[4:])):
        trajs = []
        for ids, reward in members:
            behave = [float(lp0[t] - torch.log(torch.tensor(ratio[t], dtype=torch.float64))) for t in ids]
            sample = pol.Sample("", ids, behave, version=0, truncated=False)
            trajs.append(aloop.Trajectory(n, g, "t", 0, f"e{n}", [aloop.Step(None, sample, None)], reward=reward))
            n += 1
        groups.append(aloop.Group(g, None, 0, trajs))
    learner = aloop.Learner(policy, None, loss_mod.LossConfig(iw_cap=1.8),  # a cap of its own: the loss must use it
                            aloop.LearnerConfig(epochs=2, minibatches=2, grad_clip=1e9, lr=0.25, weight_decay=0.5))
    assert (learner.optimizer.defaults["lr"], learner.optimizer.defaults["weight_decay"]) == (0.25, 0.5)  # AdamW's
    learner.optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.5)  # large steps: a late pi_prox would show
    steps, norms = [], []
    step = learner.optimizer.step
    learner.optimizer.step = lambda *a, **k: (steps.append(policy.model.theta.detach().clone()),
                                              norms.append(float(policy.model.theta.grad.norm())), step(*a, **k))
    losses, grpo_loss = [], loss_mod.grpo_loss
    monkeypatch.setattr(loss_mod, "grpo_loss", lambda *a, **k: (lambda r: (losses.append(float(r[0])), r)[1])(
        grpo_loss(*a, **k)))
    m = learner.update(groups)

    prox_calls = [c for c in policy.calls if not c[0]]
    first_grad = next(i for i, c in enumerate(policy.calls) if c[0])
    assert all(not c[0] for c in policy.calls[:first_grad]) and len(prox_calls) == first_grad  # all before training
    assert sorted(r for c in prox_calls for r in c[2]) == sorted(tuple(ids) for ids, _ in replies)  # each row once
    assert all(torch.equal(c[1], theta0) for c in prox_calls)  # at the start weights
    assert len(steps) == 2 * 2 and not torch.equal(steps[1], steps[0])  # 4 optimizer steps; the weights moved
    tokens = [t for ids, _ in replies for t in ids]
    assert m["iw_mean"] == pytest.approx(sum(ratio[t] for t in tokens) / len(tokens), rel=1e-6)
    assert m["iw_over_cap_frac"] == pytest.approx(sum(ratio[t] > 1.8 for t in tokens) / len(tokens))  # 4 of 12
    assert m["iw_max"] == pytest.approx(6.0)
    assert m["grad_norm"] == pytest.approx(sum(norms) / len(norms))  # the mean over the 4 optimizer steps
    assert m["tokens"] == len(tokens) == 12  # a count over one pass, not summed over epochs or minibatches
    assert m["degenerate_groups"] == 1  # the third group's rewards are equal: counted once, not per step
    assert len(losses) == 4 and m["loss"] == pytest.approx(sum(losses) / 4)  # the mean over the optimizer steps


def test_the_ranks_of_a_data_parallel_learner_add_up_to_one_learner(monkeypatch):
    """Data parallelism's arithmetic in one process, world = 2: rank r trains rows r, r + 2, ... of the batch (7 rows,
    micro-batch 3: rank 1 is a row short and runs an empty chunk, as a sharded model needs), scaled so that FSDP's
    gradient average is the whole batch's gradient; `_gather_metrics` sums the ranks' token-weighted metrics and
    takes the max of iw_max. Each rank has its own copy of the weights; one plain SGD step (the step = -gradient)."""
    lp0 = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).log_softmax(-1)
    members = [[([3, 5], 1.0), ([2, 3, 4], 0.0)], [([3, 4], 1.0), ([1], 0.0), ([5, 0, 2], 0.0)],
               [([2, 2], 0.0), ([4], 0.0)]]  # 7 rows; the last group's rewards are all equal (degenerate)
    groups, n = [], 1  # ids from 1: the empty chunk then stands in with a row whose advantage is not 0
    for g, trajs in enumerate(members):
        group = []
        for ids, reward in trajs:
            # off-policy: importance weights 1, e^.3, e^.6; the first row on-policy, as it is the one rank 1's empty
            # chunk stands in with: there its pi_prox is 0, so its weight e^-log p (1.6 to 6.1) leaves some tokens
            # under the cap, and an empty chunk weighted other than 0 would move rank 1's step
            behave = [float(lp0[t]) - (0.3 * (t % 3) if n > 1 else 0.0) for t in ids]
            group.append(aloop.Trajectory(n, g, "t", 0, f"e{n}", [aloop.Step(None, pol.Sample("", ids, behave, 0,
                                                                                                False), None)],
                                          reward=reward))
            n += 1
        groups.append(aloop.Group(g, None, 0, group))

    def run(rank, world):
        policy = ThetaPolicy()
        learner = aloop.Learner(policy, None, cfg=aloop.LearnerConfig(micro_batch=3, grad_clip=1e9), rank=rank,
                                world=world)
        learner.optimizer = torch.optim.SGD(policy.model.parameters(), lr=1.0)
        learner._gather_metrics = lambda m: m  # the ranks' own metrics: gathered below
        metrics = learner.update(groups)
        return policy.model.theta.detach() - torch.linspace(-1.0, 1.0, 6, dtype=torch.float64), metrics, learner

    one_step, one, _ = run(0, 1)
    (step0, raw0, learner0), (step1, raw1, _) = run(0, 2), run(1, 2)
    assert torch.allclose((step0 + step1) / 2, one_step, atol=1e-12) and one_step.abs().max() > 1e-3
    assert not torch.allclose(step0, step1)  # the ranks trained different rows

    import torch.distributed as dist

    peer = []  # rank 1's tensors, in call order; rank 0 combines them as all_reduce would
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=dist.ReduceOp.SUM: peer.append(t.clone()))
    aloop.Learner._gather_metrics(learner0, raw1)

    def combine(t, op=dist.ReduceOp.SUM):
        other = peer.pop(0)
        t.copy_(torch.maximum(t, other) if op == dist.ReduceOp.MAX else t + other)

    monkeypatch.setattr(dist, "all_reduce", combine)
    gathered = aloop.Learner._gather_metrics(learner0, raw0)
    assert set(gathered) == set(one) and not peer
    for key in one:
        if key != "grad_norm":  # each copy's local gradient norm here; FSDP's is of the whole gradient
            assert gathered[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert gathered["iw_max"] == pytest.approx(math.exp(0.6)) and one["tokens"] == 14
    assert one["degenerate_groups"] == 1
    # the token weights by hand: |A| / |T| averaged over the success (failure) tokens, A = r_hat / k (k = 10)
    trajs = [ids_reward for g in members for ids_reward in g]
    reward = torch.tensor([r for _, r in trajs])
    r_hat, _ = loss_mod.group_advantages(reward, torch.tensor([g for g, m in enumerate(members) for _ in m]))
    per_token = [(abs(float(a)) / 10 / 14, r > 0) for (ids, r), a in zip(trajs, r_hat) for _ in ids]
    for key, success in (("token_weight_success", True), ("token_weight_failure", False)):
        expected = [w for w, s in per_token if s == success]
        assert one[key] == pytest.approx(sum(expected) / len(expected), rel=1e-6), key


def test_publish_writes_the_trained_weights_in_the_engines_dtype(tiny_dir, tmp_path):
    from asyncwebrl import weights

    policy = pol.Policy(pol.PolicyConfig(model=str(tiny_dir)))
    learner = aloop.Learner(policy, None)
    digest = learner.publish(tmp_path / "v1", torch.bfloat16)
    files = dict(weights.read(tmp_path / "v1"))
    assert digest == weights.digest_of(tmp_path / "v1") and {t.dtype for t in files.values()} == {torch.bfloat16}
    held = dict(policy.model.named_parameters())
    assert set(files) == set(held) and all(torch.equal(files[k], held[k].detach().to(torch.bfloat16)) for k in files)


def test_the_token_weight_metrics_are_means_over_their_tokens_and_over_the_optimizer_steps():
    """fig. 6's numbers by hand, over 2 epochs (2 optimizer steps on the same batch): a one-token success and a
    one-token failure, A = +-r_hat / k with r_hat = +-0.5 / std([1, 0]) and k = 10; each token's weight is
    |A| / |T| with |T| = 2 tokens, the same at every step, so the mean over the steps is that weight."""
    policy = ThetaPolicy()
    lp0 = policy.model.theta.detach().log_softmax(-1)
    trajs = [aloop.Trajectory(i, 0, "t", 0, f"e{i}", [aloop.Step(None, pol.Sample("", [t], [float(lp0[t])], 0, False),
                                                                  None)], reward=r)
             for i, (t, r) in enumerate([(3, 1.0), (2, 0.0)])]
    learner = aloop.Learner(policy, None, cfg=aloop.LearnerConfig(epochs=2, minibatches=1, grad_clip=1e9))
    m = learner.update([aloop.Group(0, None, 0, trajs)])
    weight = 0.5 / float(torch.tensor([1.0, 0.0]).std()) / 10 / 2
    assert m["token_weight_success"] == pytest.approx(weight, rel=1e-4)  # (float32 in the loss)
    assert m["token_weight_failure"] == pytest.approx(weight, rel=1e-4)
