"""The short versions of the fault experiments (experiments/soak.py, experiments/kill_resume.py): real chromium, the
tiny model, the real loop and the real 05_train.py, with faults injected and SIGKILLs at chosen moments. Each
asserts every check its experiment reports, so a lost episode, a fault trained as reward 0, a leaked screenshot, a
chromium left behind, a half-written checkpoint or a duplicated metrics row fails the test."""
import json

import pytest

from experiments import kill_resume, soak


@pytest.mark.browser
@pytest.mark.slow
def test_a_short_soak_accounts_for_every_episode_and_trains_no_fault(tmp_path):
    r = soak.main(["--episodes", "60", "--out", str(tmp_path / "soak.json")])
    assert json.loads((tmp_path / "soak.json").read_text())["checks"] == r["checks"]
    assert all(r["checks"].values()), r["checks"]
    assert r["ledger"]["faults"] > 0 and sum(r["injected"].values()) > 0


@pytest.mark.browser
@pytest.mark.slow
def test_a_run_killed_during_a_checkpoint_write_and_a_refresh_resumes_to_the_end(tmp_path):
    r = kill_resume.main(["--kills", "2", "--updates", "5", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "k.json")])
    assert r["passed"], r["checks"]
    assert r["checks"]["killed_during_checkpoint"] == 1 and r["checks"]["killed_during_refresh"] == 1
    assert r["kills"] == 2 and r["checks"]["versions_continuous"] and r["checks"]["no_half_written_checkpoint"]
    run = tmp_path / "work" / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [row["time_s"] for row in rows]
    assert times == sorted(times)  # the resumed clock counts on from the killed run's
    log = (tmp_path / "work" / "train.log").read_text()
    for a in r["attempts"][1:]:  # each resume said where it continued from (a kill before any checkpoint: anew)
        assert a["resumed_from"] == 0 or f"from v{a['resumed_from']:04d} (version {a['resumed_from']})" in log
    for folder in (run / "trajectories").iterdir():  # a killed update's trajectories went; the redone ones stay
        assert len(list(folder.iterdir())) <= 1, folder
    # the run directory holds what a researcher needs
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["updates"] == 5 and config["commit"]
    assert (run / "timeline.jsonl").stat().st_size > 0
    assert list((run / "trajectories").glob("v0005/*/step*.jpg"))
    assert (run / "checkpoints" / "v0005" / "model" / "model.safetensors").is_file()
    for key in ("success", "steps", "tokens_per_step", "loss", "clip_frac", "staleness_max", "samples_per_s",
                "utilisation", "faults"):
        assert key in rows[-1]
    # the resumed run's logged trajectories, in the viewer (issue 23): every page's screenshots load
    from test_report import open_real_report

    seen = open_real_report(tmp_path / "work" / "run")
    assert seen["episodes"] >= 4 and seen["images"] >= seen["episodes"] and seen["markers"] == seen["drawable"]
