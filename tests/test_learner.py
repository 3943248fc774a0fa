"""04's Learner on the real tiny policy: the sign of the update is right, and on-policy data gives ratio 1."""
import pytest
import torch

from asyncwebrl import load

env = load("01_env")
pol = load("02_policy")
aloop = load("04_async_loop")


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
    weights = []
    for micro in (1, 16):
        torch.manual_seed(0)
        p = pol.Policy(pol.PolicyConfig(model=str(tiny_dir), dtype="float32"))  # fp32 on a GPU too: exact sums
        learner = aloop.Learner(p, shot_store, cfg=aloop.LearnerConfig(micro_batch=micro, grad_clip=1e9))
        learner.optimizer = torch.optim.SGD(p.model.parameters(), lr=1.0)  # step = -gradient: compare gradients
        start = p.model.get_input_embeddings().weight.detach().clone()
        learner.update([group_of(p, replies)])
        weights.append(p.model.get_input_embeddings().weight.detach() - start)
    assert weights[0].abs().max() > 1e-4
    assert torch.allclose(weights[0], weights[1], atol=1e-6)
