"""05_train.py from the command line: dry-run placement, bad input, and a real tiny run killed and resumed."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from asyncwebrl import ROOT, load

train = load("05_train")
SMALL = ["--workers", "4", "--group-size", "2", "--batch-groups", "1", "--max-steps", "3", "--no-dynamic-sampling",
         "--tasks", "click-button,click-link"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "05_train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)


@pytest.mark.parametrize("gpus,rollout,trainer", [(1, [0], [0]), (2, [0], [1]), (8, [0, 1, 2, 3, 4, 5], [6, 7])])
def test_dry_run_prints_placement_and_config(gpus, rollout, trainer, capsys):
    assert train.main(["--dry-run", "--gpus", str(gpus), "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert f"placement: {gpus} GPU(s)" in out
    config = json.loads(out[out.index("{"):])
    assert config["gpus"] == gpus and config["group_size"] == 8 and config["batch_groups"] == 16
    p = train.placement(train.TrainConfig(gpus=gpus))
    assert (p["rollout_devices"], p["trainer_devices"]) == (rollout, trainer)


def test_config_precedence_defaults_preset_file_flags(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 0.5, "group_size": 3}))
    cfg, _ = train.resolve(["--preset", "paper", "--config", str(f), "--group-size", "5"])
    assert cfg.lr == 0.5 and cfg.group_size == 5 and cfg.batch_groups == 16 and cfg.workers == 128
    assert train.resolve([])[0] == train.TrainConfig(run_dir=train.resolve([])[0].run_dir)


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such directory"),
    (["--gpus", "8"], "--gpus 8: this machine has"),
    (["--tasks", "click-buton"], "unknown MiniWoB++ task(s): ['click-buton']"),
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--mode", "fast"], "--mode must be one of async, sync"),
    (["--updates", "0"], "0 only with --warmstart-steps"),
    (["--warmstart-steps", "5", "--updates", "0", "--tasks", "click-color,click-shape"], "no task with a scripted"),
    (["--judge", "chat"], "--judge chat needs --judge-url and --judge-model"),
    (["--judge", "gpt"], "--judge must be one of rubric_keywords, chat"),
])
def test_bad_input_gives_one_clear_message_and_nonzero_exit(args, message, capsys):
    with pytest.raises(SystemExit) if args == ["--bogus"] else _no_raise():
        rc = train.main(args)
        assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_tiny_learn_preset_warm_starts_with_a_tight_horizon():
    cfg, _ = train.resolve(["--preset", "tiny-learn"])
    assert cfg.warmstart_steps > 0 and cfg.max_steps == cfg.k == 4 and "enter-text" not in cfg.tasks
    assert all(t.max_steps == 4 and t.split == "train" for t in train.load_tasks(cfg))


def test_bad_task_file_names_the_file_and_line(tmp_path):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"task_name": "find it", "website": "https://example.org", "evaluator_reference": []}\n')
    r = cli("--task-file", str(bad), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and f"{bad}:1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing started


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rows(run):
    """Complete metrics rows (a row being written at the moment of the kill is not one)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # text after the last newline: partial
    return [json.loads(line) for line in lines]


@pytest.mark.browser
@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_more_loss_than_the_checkpoint_interval(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "05_train.py"), "--run-dir", str(run), "--updates", "4",
                             "--checkpoint-every", "1", *SMALL], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 240
    while len(_rows(run)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = len(_rows(run))
    assert 2 <= logged < 4, "the run must be killed mid-way"
    checkpoint = int((run / "checkpoints" / "latest").read_text().strip()[1:])
    assert logged - checkpoint <= 1  # lost at most the updates since the last checkpoint (interval 1)

    r = cli("--resume", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {run} from v{checkpoint:04d} (version {checkpoint})" in r.stdout
    versions = [row["version"] for row in _rows(run)]
    assert versions == [1, 2, 3, 4]  # continued, nothing duplicated
    # the run directory holds what a researcher needs
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["updates"] == 4 and config["commit"]
    assert (run / "timeline.jsonl").stat().st_size > 0
    saved = list((run / "trajectories").glob("v0004/*/trajectory.json"))
    assert saved and list(saved[0].parent.glob("step*.jpg"))
    assert (run / "checkpoints" / "v0004" / "model" / "model.safetensors").is_file()
    row = _rows(run)[-1]
    for key in ("success", "steps", "tokens_per_step", "loss", "clip_frac", "staleness_max", "samples_per_s",
                "utilisation"):
        assert key in row


@pytest.mark.browser
@pytest.mark.slow
def test_compare_sync_writes_the_benchmark_json_and_figure(tmp_path):
    from asyncwebrl import throughput_bench as bench

    cfg, _ = train.resolve(["--updates", "2", *SMALL, "--max-steps", "2", "--workers", "2"])
    summary = bench.compare_sync(cfg, out=tmp_path)
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
    assert [r["name"] for r in saved["ablation"]] == [name for name, _ in bench.VARIANTS]
    by = {r["name"]: r for r in saved["ablation"]}
    assert saved["speedup_async_over_sync"] == pytest.approx(
        by["async (full)"]["samples_per_s"] / by["sync"]["samples_per_s"], rel=1e-2)
    slower = min(saved["rollout_only_samples_per_s"], saved["train_only_samples_per_s"])
    assert saved["overlap_efficiency"] == pytest.approx(by["async (full)"]["samples_per_s"] / slower, rel=1e-2)
    assert all(r["trajectories"] == 2 * 2 for r in saved["ablation"])  # same trained work in every variant
    assert set(saved["timelines"]) == {"sync", "async (full)"} and summary["commit"]
    assert saved["config"]["dynamic_sampling"] is False and by["sync"]["vs_sync"] == 1.0  # the pipeline, not luck


@pytest.mark.slow
def test_sharded_update_over_two_gloo_processes_equals_the_single_process_update(tiny_dir, tmp_path):
    """The FSDP2 path of --gpus N, on CPU: same batch, same start, plain SGD; the gathered weights must match."""
    import torch

    results = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}.pt"
        r = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_update.py"), str(tiny_dir), str(out),
                            str(world)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        results[world] = torch.load(out, weights_only=False)
    one, two = results[1]["state"], results[2]["state"]
    start = load("02_policy").Policy(load("02_policy").PolicyConfig(model=str(tiny_dir))).state_dict()
    assert set(one) == set(two)
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # the update did something
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    for key in ("loss", "tokens", "clip_frac"):
        assert results[2]["metrics"][key] == pytest.approx(results[1]["metrics"][key], abs=1e-6)


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["spawn", "torchrun"])
def test_training_with_the_trainer_sharded_over_two_processes(tmp_path, launcher):
    """--trainer-procs 2 (the script spawns its ranks) and torchrun (the multi-node launcher, here one node)."""
    run = tmp_path / "run"
    args = ["--run-dir", str(run), "--updates", "2", "--checkpoint-every", "2", *SMALL]
    if launcher == "spawn":
        r = cli(*args, "--trainer-procs", "2")
    else:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(ROOT / "05_train.py"), *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FSDP2 over 2 CPU processes (gloo)" in r.stdout
    assert [row["version"] for row in _rows(run)] == [1, 2]
    ckpt = run / "checkpoints" / "v0002"
    assert (ckpt / "optimizer.rank0.pt").is_file() and (ckpt / "optimizer.rank1.pt").is_file()
    assert (ckpt / "model" / "model.safetensors").is_file()


def test_optional_loggers_that_are_not_installed_are_a_clear_error(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    assert train.main(["--tensorboard", "--run-dir", str(tmp_path / "r"), "--updates", "1", *SMALL]) == 2
    assert "--tensorboard needs `pip install tensorboard`" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything started


def test_judge_chat_registers_the_llm_judge_for_webgym_tasks(tmp_path, monkeypatch):
    from asyncwebrl.judge import ChatJudge

    f = tmp_path / "tasks.jsonl"
    f.write_text('{"task_name": "find it", "website": "example.org", "evaluator_reference": [{"facts": ["a"]}]}\n')
    monkeypatch.setitem(train.env.JUDGES, "chat", None)  # restored after the test
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    cfg, _ = train.resolve(["--task-file", str(f), "--judge", "chat", "--judge-url", "http://h/v1", "--judge-model", "m"])
    tasks = train.load_tasks(cfg)
    judge = train.env.JUDGES["chat"]
    assert [t.judge for t in tasks] == ["chat"] and isinstance(judge, ChatJudge)
    assert (judge.url, judge.model, judge.api_key) == ("http://h/v1/chat/completions", "m", "secret")
    assert "secret" not in json.dumps(dataclasses.asdict(cfg))  # the key never lands in the saved config
