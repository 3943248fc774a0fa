"""experiments/paper_scale.py: 04's real scheduler on simulated time. What is asserted here holds whatever the machine's
speed (the throughput ratios are the study's output, in figures/paper_scale.json, not claims of a unit test)."""
import dataclasses
import json
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncwebrl import figures
from experiments import paper_scale as ps

SMALL = ps.Profile(group_size=4, batch_groups=2, tasks=12, reply_s=6.0, train_s=20.0, refresh_s=2.0, judge_s=2.0)


@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0])
def test_lengths_average_the_papers_steps_after_the_horizon_cut(sigma):
    p = dataclasses.replace(ps.Profile(), length_sigma=sigma)
    rng = random.Random(1)
    for target in (p.steps_success, p.steps_failure):
        mean = ps.stretch(p, target, sigma)
        drawn = [ps.length(mean, sigma, rng.gauss(0, 1), rng.random(), p.horizons[i % 3]) for i in range(20000)]
        assert abs(statistics.fmean(drawn) - target) < 0.03 * target
        assert min(drawn) >= 1 and max(drawn) <= max(p.horizons)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_real_loop_runs_the_profile(mode):
    r = ps.run(SMALL, scale=2000, updates=4, warm=1, mode=mode)
    assert r["trained_groups"] == 4 * SMALL.batch_groups  # 04's trainer took exactly B groups per update
    assert r["trajectories_per_s"] > 0 and 0 < r["trainer_busy"] < 1
    if mode == "sync":
        assert r["staleness_max"] == 0  # sync trains only replies of the current weights
    assert r["steps_failure"] is None or r["steps_failure"] <= max(SMALL.horizons)


def test_the_engine_pauses_requests_while_weights_are_replaced(tmp_path):
    import asyncio
    import threading

    from asyncwebrl import weights

    engine = ps.SimEngine(dataclasses.replace(SMALL, refresh_s=200.0), ps.Clock(1000), seed=0)
    import torch

    weights.write([("w", torch.ones(2))], tmp_path / "v1")
    loader = threading.Thread(target=engine.load_weights, args=(str(tmp_path / "v1"), 1))
    loader.start()

    async def ask():
        await asyncio.sleep(0.02)  # the refresh has begun
        return await engine.asample(ps.pol.Turn("p", ("k",), 0), None)

    sample = asyncio.run(ask())
    loader.join()
    assert sample.version == 1  # it waited for the new weights instead of replying with the old ones


def test_fig1_draws_measured_and_simulated_side_by_side(tmp_path):
    measured = json.loads((ps.ROOT / "figures" / "throughput.json").read_text())
    simulated = dict(variants={n: dict(vs_sync=1.0 + i / 4, length_cv=0.5) for i, (n, _) in enumerate(ps.VARIANTS)},
                     overlap_efficiency=0.9, rollout_over_train=4.0,
                     sweep_spread=[dict(length_cv=c, ratio=1 + c) for c in (0.1, 0.5)],
                     sweep_train=[dict(train_over_rollout=x, ratio=2 - x) for x in (0.2, 1.0)])
    figures.fig1_figure(measured, simulated, tmp_path / "both.png")
    figures.fig1_figure(measured, None, tmp_path / "measured.png")
    figures.paper_scale_figure(simulated, tmp_path / "sim.png")
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("both.png", "measured.png", "sim.png"))


@pytest.mark.parametrize("argv", [["--scale", "0"], ["--scale", "1e9"], ["--updates", "2"], ["--scale", "x"]])
def test_bad_flags_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ps.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


@settings(max_examples=40, deadline=None)
@given(scale=st.one_of(st.text(max_size=12), st.floats().map(repr)),
       updates=st.one_of(st.text(max_size=6), st.integers(-10, 100).map(str)))
def test_any_flag_values_run_or_are_one_line_errors(scale, updates, tmp_path_factory):
    """Any text for --scale/--updates: the study is started with valid numbers, or argparse refuses with exit 2."""
    out, seen = tmp_path_factory.mktemp("ps"), []
    fake = dict(variants={n: dict(vs_sync=1.0, length_cv=0.5) for n, _ in ps.VARIANTS}, overlap_efficiency=1.0,
                rollout_over_train=1.0)
    original = ps.study
    ps.study = lambda p, s, u, q: seen.append((s, u)) or fake
    try:
        code = ps.main(["--scale", scale, "--updates", updates, "--out", str(out), "--quick"])
    except SystemExit as e:
        code = e.code
    finally:
        ps.study = original
    assert code in (0, 2)
    if code == 0:
        s, u = seen[0]
        assert 1 <= s <= 5000 and u >= 4 and (out / "paper_scale.json").is_file()
