"""06_eval.py: the evaluation table (random floor, oracle ceiling, a model checkpoint), and the figures from logs."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncwebrl import ROOT, load
from asyncwebrl.figures import RunLogError, make_figures

eval_mod = load("06_eval")
EASY3 = "click-button,click-link,click-tab"


def test_wilson_interval():
    lo, hi = eval_mod.wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35  # the textbook value 0.278
    lo, hi = eval_mod.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert math.isnan(eval_mod.wilson(0, 0)[0])


def test_table_by_slice_counts_successes_and_failures_separately():
    recs = [dict(task="a", difficulty="easy", success=True, steps=1, tokens=10),
            dict(task="a", difficulty="easy", success=False, steps=5, tokens=50),
            dict(task="b", difficulty="medium", success=True, steps=3, tokens=20)]
    t = eval_mod.table(recs)
    assert t["slices"]["all"]["success"] == pytest.approx(2 / 3)
    assert t["slices"]["easy"]["steps_success"] == 1 and t["slices"]["easy"]["steps_failure"] == 5
    assert t["slices"]["all"]["tokens_success"] == 15 and t["slices"]["hard"]["episodes"] == 0
    assert t["tasks"]["b"]["success"] == 1.0


@pytest.mark.browser
@pytest.mark.slow
def test_oracle_beats_random_on_held_out_episodes(tmp_path, capsys):
    tables = {}
    for agent in ("random", "oracle"):
        out = tmp_path / f"{agent}.json"
        assert eval_mod.main(["--agent", agent, "--tasks", EASY3, "--episodes", "6", "--out", str(out)]) == 0
        tables[agent] = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "easy" in printed
    oracle, rand = tables["oracle"]["slices"]["all"], tables["random"]["slices"]["all"]
    assert oracle["episodes"] == rand["episodes"] == 18
    assert oracle["success"] == 1.0 and rand["success"] < 0.9
    assert oracle["ci95"][0] > rand["success"]  # the ceiling is above the floor beyond noise
    # held-out instances: every agent plays the same seeds, all at or above TRAIN_SEEDS
    seeds = {(r["task"], r["seed"]) for r in tables["oracle"]["records"]}
    assert seeds == {(r["task"], r["seed"]) for r in tables["random"]["records"]}
    assert min(s for _, s in seeds) >= load("01_env").TRAIN_SEEDS


@pytest.mark.browser
@pytest.mark.slow
def test_model_checkpoint_is_evaluated_with_its_run_config(tiny_dir, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "v0002").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("v0002\n")
    (run / "checkpoints" / "v0002" / "model").symlink_to(tiny_dir, target_is_directory=True)
    (run / "config.json").write_text(json.dumps(dict(config=dict(history=2, images=1, max_new_tokens=24,
                                                                 memory_tokens=8, constrained="on"))))
    path, cfg = eval_mod.resolve_model(run)
    assert path == run / "checkpoints" / "v0002" / "model" and cfg["max_new_tokens"] == 24
    out = tmp_path / "t.json"
    assert eval_mod.main([str(run), "--tasks", "click-button", "--episodes", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "greedy" and result["slices"]["all"]["episodes"] == 3
    assert result["model"] == str(run / "checkpoints" / "v0002" / "model")  # which checkpoint "latest" was
    assert all(0 < r["tokens"] <= 24 * r["steps"] for r in result["records"])  # the run's reply budget was used


def test_bad_target_is_a_clear_error(tmp_path, capsys):
    assert eval_mod.main([str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Figures from a synthetic run log


def _run(folder, normalizer, mode, seed, n=12):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(config=dict(normalizer=normalizer, mode=mode,
                                                                    decoupled=True, seed=seed), commit="abc123")))
    rows = []
    for v in range(1, n + 1):
        rows.append(dict(version=v, time_s=10.0 * v * (2 if mode == "sync" else 1),
                         rollout_success=0.3 + 0.02 * v + 0.01 * seed, rollout_steps_success=2.0,
                         rollout_steps_failure=4.0 - 0.1 * v * (normalizer == "const"),
                         rollout_tokens_per_step=30.0 - v, clip_frac_coupled=0.1, clip_frac_decoupled=0.05,
                         token_weight_success=1e-3, token_weight_failure=5e-4))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_figures_from_synthetic_logs(tmp_path):
    dirs, logs = [], {}
    for norm in ("const", "traj"):
        for seed in range(3):
            d = tmp_path / f"{norm}-s{seed}"
            logs[d.name] = _run(d, norm, "async", seed)
            dirs.append(d)
    sync = tmp_path / "sync-s0"
    _run(sync, "const", "sync", 0)
    (sync / "eval-model-train-greedy.json").write_text(json.dumps(dict(
        agent="model", mode="greedy", split="train",
        slices={"easy": dict(episodes=10, success=0.6, ci95=[0.31, 0.83]), "all": dict(episodes=10, success=0.6,
                                                                                       ci95=[0.31, 0.83])})))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "throughput.json").write_text((ROOT / "figures" / "throughput.json").read_text())  # a real benchmark
    out = tmp_path / "figs"
    made = make_figures(dirs + [sync, bench], out)
    names = {p.name for p in made}
    for stem in ("fig1_throughput", "fig2_success", "fig3_steps", "fig4_tokens", "fig5_clip_rate",
                 "fig6_token_weight", "fig7_success_by_slice", "fig8_success_wallclock"):
        assert f"{stem}.png" in names and (out / f"{stem}.png").stat().st_size > 10_000
        assert (out / f"{stem}.json").is_file()
    fig2 = json.loads((out / "fig2_success.json").read_text())["panels"]["rollout_success"]
    # raw numbers are the log's, by hand: run const-s1, version 4 -> 0.3 + 0.08 + 0.01
    assert fig2["runs"]["const-s1"]["y"][3] == pytest.approx(0.39)
    assert fig2["curves"]["1/k"]["runs"] == 3 and fig2["curves"]["1/|tau_i|"]["runs"] == 3
    assert fig2["curves"]["1/k, sync"]["runs"] == 1  # the sync baseline is a curve of its own
    # the 1/|tau_i| curve at version 1: median over seeds 0, 1, 2 of 0.32, 0.33, 0.34 (window of one point)
    assert fig2["curves"]["1/|tau_i|"]["median"][0] == pytest.approx(0.33)
    assert fig2["curves"]["1/|tau_i|"]["lo"][0] == pytest.approx(0.32)
    # moving average of 5 at version 12 of traj-s0: mean of versions 8..12
    assert fig2["curves"]["1/|tau_i|"]["lo"][11] == pytest.approx(sum(0.3 + 0.02 * v for v in range(8, 13)) / 5)
    fig3 = json.loads((out / "fig3_steps.json").read_text())["panels"]["rollout_steps_failure"]
    assert fig3["runs"]["const-s0"]["y"][9] == pytest.approx(3.0)
    fig8 = json.loads((out / "fig8_success_wallclock.json").read_text())["panels"]["rollout_success"]
    assert fig8["runs"]["sync-s0"]["x"][2] == 60.0 and set(fig8["curves"]) == {"async, 1/k", "async, 1/|tau_i|", "sync, 1/k"}
    fig7 = json.loads((out / "fig7_success_by_slice.json").read_text())
    assert fig7["tables"]["sync-s0/eval-model-train-greedy.json"]["easy"]["success"] == 0.6
    assert fig7["bars"]["train tasks, held-out episodes, greedy | 1/k, sync"] == dict(
        runs=1, slices=dict(easy=0.6, medium=pytest.approx(float("nan"), nan_ok=True), hard=pytest.approx(
            float("nan"), nan_ok=True), all=0.6))


def test_a_resumed_runs_clock_counts_on(tmp_path):
    from asyncwebrl.figures import read_run

    rows = _run(tmp_path / "run", "const", "async", 0, n=6)
    for r in rows[4:]:  # resumed from the checkpoint of version 4: the new loop's clock starts again at 0
        r["time_s"] = 7.0 * (r["version"] - 4)
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [m["time_s"] for m in read_run(tmp_path / "run")["metrics"]] == [10, 20, 30, 40, 47, 54]


def test_missing_or_truncated_log_names_the_file(tmp_path):
    d = tmp_path / "run"
    _run(d, "const", "async", 0, n=3)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"version": 4, "rollout_succ')  # a kill mid-write
    with pytest.raises(RunLogError, match=r"metrics.jsonl line 4: truncated"):
        make_figures([d], tmp_path / "out")
    (d / "metrics.jsonl").unlink()
    with pytest.raises(RunLogError, match=r"metrics.jsonl: missing"):
        make_figures([d], tmp_path / "out")
    assert eval_mod.main(["--figures", str(d)]) == 2


def test_committed_figures_are_regenerated_from_the_committed_run_logs(tmp_path):
    """figures/fig2-4,7,8 in the repository are exactly what the logs in figures/logs/learn give (README's numbers)."""
    logs = ROOT / "figures" / "logs" / "learn"
    runs = [logs / "warmstart"] + sorted(p for p in logs.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(runs) == 8
    make_figures(runs, tmp_path)
    for stem in ("fig2_success", "fig3_steps", "fig4_tokens", "fig7_success_by_slice", "fig8_success_wallclock"):
        committed = json.loads((ROOT / "figures" / f"{stem}.json").read_text())
        fresh = json.loads((tmp_path / f"{stem}.json").read_text())
        assert json.dumps(fresh, sort_keys=True).replace(str(ROOT) + "/", "") == json.dumps(committed, sort_keys=True)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 50) | st.floats() | st.text(max_size=6),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=8)
METRIC = st.sampled_from(["version", "time_s", "rollout_success", "success", "steps", "clip_frac_coupled",
                          "rollout_steps_failure", "token_weight_success", "utilisation"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(METRIC, JSON, max_size=5) | JSON, min_size=1, max_size=4), st.integers(0, 3))
def test_any_metrics_rows_give_figures_or_one_typed_error(tmp_path_factory, rows, good):
    """Rows of any shape (hand-edited, another version's, another program's) beside good ones: the figures are
    drawn (a value that is not a number is a gap) or RunLogError names the file and line; nothing else escapes."""
    d = tmp_path_factory.mktemp("logs") / "run"
    _run(d, "const", "async", 0, n=good + 1)
    with open(d / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    try:
        make_figures([d], d / "out")
    except RunLogError as e:
        assert str(d / "metrics.jsonl") in str(e)
