"""Helper script for tests/test_05_train.py (not a test module): one learner update on a fixed batch, either in one
process or sharded with FSDP2 over 2 CPU processes (gloo), with plain SGD so the step is the gradient. Saves the
gathered full state dict and every metric to OUT.   python tests/sharded_update.py MODEL_DIR OUT {1|2}"""
import io
import sys

import torch

from asyncwebrl import distributed as dist, load, weights

env, pol, aloop, train = load("01_env"), load("02_policy"), load("04_async_loop"), load("05_train")


def batch(policy):
    from PIL import Image

    store = env.ScreenshotStore()
    buf = io.BytesIO()
    Image.new("RGB", (160, 210), "white").save(buf, "JPEG")
    store.put("ep", buf.getvalue())
    obs = env.Observation(goal="Click OK.", url="x", screenshot="ep:0",
                          elements=(env.Element(0, "button", "OK", (1.0, 1.0, 9.0, 9.0)),
                                    env.Element(1, "button", "No", (1.0, 20.0, 9.0, 9.0))))
    turn = pol.make_turn(policy.tokenizer, obs, pol.AgentState(), policy.cfg)
    trajs = []
    for i, (reply, reward) in enumerate([("Memory: a\nAction: click(#0)", 1.0), ("Memory: bb\nAction: click(#1)", 0.0),
                                         ("Memory: \nAction: scroll(down)", 0.0)]):
        ids = policy.tokenizer(reply)["input_ids"] + [policy.tokenizer.eos_token_id]
        sample = pol.Sample(reply, ids, [-1.0] * len(ids), 0, False)
        steps = [aloop.Step(turn, sample, None)] * (1, 2, 2)[i]  # 5 rows: one rank is a row short (an empty chunk)
        trajs.append(aloop.Trajectory(i, 0, "t", 0, "ep", steps, reward=reward))
    return [aloop.Group(0, None, 0, trajs)], store


def update(rank: int, world: int, model: str, out: str, port: int = 0):
    if world > 1:
        dist.init(rank, world, port, "cpu", timeout_s=300)
    cfg = train.TrainConfig(model=model, micro_batch=2, epochs=2, minibatches=2)  # pi_prox != pi after a step
    pcfg = pol.PolicyConfig(model=model)
    policy, learner = train.make_learner(cfg, pcfg, None, rank, world)
    learner.optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.3)
    groups, store = batch(policy)
    learner.store = store
    metrics = learner.update(groups)
    state = dist.full_state_dict(policy.model) if world > 1 else policy.state_dict()
    # the refresh's handoff: every rank gathers tensor by tensor, rank 0 writes (as ShardedLearner.publish does)
    tensors = dist.full_tensors(policy.model)
    digest = weights.write(tensors, out + ".weights") if rank == 0 else [None for _ in tensors]
    if rank == 0:
        torch.save(dict(state=state, metrics=metrics, digest=digest, digest_of_state=weights.write(
            state.items(), out + ".state")), out)


if __name__ == "__main__":
    model, out, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if world == 1:
        update(0, 1, model, out)
    else:
        import torch.multiprocessing as mp

        mp.spawn(update, args=(world, model, out, train.dist.free_port()), nprocs=world)
