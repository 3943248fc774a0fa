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
    r = kill_resume.main(["--kills", "2", "--updates", "4", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "k.json")])
    assert r["passed"], r["checks"]
    assert r["checks"]["killed_during_checkpoint"] == 1 and r["checks"]["killed_during_refresh"] == 1
    assert r["kills"] == 2 and r["checks"]["versions_continuous"] and r["checks"]["no_half_written_checkpoint"]
    # the resumed run's logged trajectories, in the viewer (issue 23): every page's screenshots load
    from test_report import open_real_report

    seen = open_real_report(tmp_path / "work" / "run")
    assert seen["episodes"] >= 4 and seen["images"] >= seen["episodes"] and seen["markers"] > 0
