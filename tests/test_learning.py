"""The tiny policy learns: a few minutes of RL on one task beat its warm start by more than noise explains."""
import json
import math

import pytest

from asyncwebrl import load

train_mod = load("05_train")
eval_mod = load("06_eval")

# click-button-sequence: click ONE, then TWO. Under a horizon of 2 steps only the demonstrations without redundant
# scrolls succeed, so the warm start clones ~7 short episodes for 12 steps: it writes the grammar but solves 25-55% of
# episodes at temperature 1 (which demonstrations succeed depends on browser timing). Then 10 updates of RL with the
# tiny-learn preset's own optimisation (4 groups x 4, 2 epochs x 2 minibatches, lr 1e-4; 9 of 9 runs of the
# 7-task experiment gained with it). Measured: 53 -> 68 of 96 (z = 2.2). At lr 3e-4 the lift was larger but RL
# collapsed in 2 of 7 runs (26 -> 7; 30 -> 29 after peaking at 0.75 rollout success). The bar is a one-sided
# two-proportion test at the 5% level (z > 1.645).
TASK, HORIZON, EPISODES = "click-button-sequence", 2, 96


def two_proportion_z(a: int, b: int, n: int) -> float:
    """z of (b - a) / n under the null that both success rates are equal (pooled variance)."""
    p = (a + b) / (2 * n)
    return (b - a) / n / math.sqrt(2 * p * (1 - p) / n) if 0 < p < 1 else 0.0


@pytest.mark.slow
@pytest.mark.browser
def test_rl_beats_the_warm_start_on_one_task(tmp_path):
    run = tmp_path / "run"
    args = ["--preset", "tiny-learn", "--tasks", TASK, "--max-steps", str(HORIZON), "--k", str(HORIZON),
            "--warmstart-steps", "12", "--warmstart-episodes", "24", "--updates", "10", "--batch-groups", "4",
            "--checkpoint-every", "10", "--run-dir", str(run)]
    assert train_mod.main(args) == 0
    results = {}
    for name, target in (("warm start", run / "warmstart" / "model"), ("after RL", run)):
        out = tmp_path / f"{name}.json"
        assert eval_mod.main([str(target), "--tasks", TASK, "--episodes", str(EPISODES), "--temperature", "1",
                              "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    before = sum(r["success"] for r in results["warm start"]["records"])
    after = sum(r["success"] for r in results["after RL"]["records"])
    assert results["after RL"]["max_steps"] == HORIZON  # evaluated under the run's own horizon
    z = two_proportion_z(before, after, EPISODES)
    print(f"success {before}/{EPISODES} -> {after}/{EPISODES}, z = {z:.2f}")
    assert z > 1.645, f"RL did not beat its warm start beyond noise: {before} -> {after} of {EPISODES} (z = {z:.2f})"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["staleness_max"] <= 2 for r in rows)


@pytest.mark.browser
def test_demonstrations_are_verbose_on_purpose_and_cloning_fits_them(tiny_dir):
    from asyncwebrl.warmstart import WORDY, WarmstartConfig, clone, collect

    env = load("01_env")
    policy = load("02_policy").Policy(load("02_policy").PolicyConfig(model=str(tiny_dir)))
    store = env.ScreenshotStore()
    cfg = WarmstartConfig(episodes=12, steps=4, batch=8, verbose=0.5, workers=4)
    demos, stats = collect(policy, env.miniwob_tasks(names=[TASK]), cfg, store)
    texts = [policy.tokenizer.decode(ids, skip_special_tokens=True) for _, ids in demos]
    # the solvers are not perfect (overlapping buttons on some seeds); failed episodes are dropped, not cloned
    assert stats["demo_success"] >= 0.6 and stats["demo_steps"] == len(demos) >= 2 * round(12 * stats["demo_success"])
    assert any("scroll(down)" in t for t in texts) and any("click(#" in t for t in texts)  # redundant and real steps
    assert any(w.split(":")[0].split(";")[0][:12] in t for t in texts for w in WORDY)  # some wordy memories
    for turn, ids in demos:  # every demonstration is a reply the constrained sampler could write
        policy.grammar.masks(turn.n_marks, ids)
        assert len(ids) <= policy.cfg.max_new_tokens and all(k in store._bytes for k in turn.images)
    losses = clone(policy, demos, store, cfg)
    assert losses[-1] < losses[0]
